"""What a shard's manifest promises its readers: the contract between make-examples, label-teacher
and the steps that read their shards (adapt-teacher, distill, evaluate).

Kept apart from the steps so that no step imports another: a reader checks a shard here, with
the same words whichever step reads it.
"""

from __future__ import annotations

from bertdistill.errors import StepError
from bertdistill.manifest import committed_input
from bertdistill.records import MAX_VOCAB
from bertdistill.store import open_folder, split_uri


def examples_info(uri: str) -> dict:
    """(L, P, vocab sha256, records) of an example shard, from the manifest make-examples wrote."""
    manifest = committed_input(uri, "make-examples", per_file=True)
    name = split_uri(uri)[1]
    return {"max_seq_length": manifest.params["max_seq_length"],
            "max_predictions_per_seq": manifest.params["max_predictions_per_seq"],
            "vocab_sha256": manifest.summary["vocab_sha256"],
            "records": manifest.outputs[name].get("records")}


def check_label_vocab(vocab_size: int, source: str) -> None:
    """The label cache stores ids in 15 bits: refuse a larger vocab before any work is done."""
    if vocab_size > MAX_VOCAB:
        raise StepError(f"{source}: its vocab has {vocab_size:,} pieces, but the label cache stores token ids in "
                        f"15 bits (at most {MAX_VOCAB:,} pieces); use a teacher with a smaller vocab")


def open_labels(uri: str, vocab_sha256: str, top_k: int) -> dict:
    """Check a labelled shard before reading it: refused unless made with this vocab and this k."""
    made = committed_input(uri, "label-teacher", per_file=True).summary
    if made["vocab_sha256"] != vocab_sha256:
        raise StepError(f"{uri} was labelled with another vocab (sha256 {made['vocab_sha256'][:12]}…, expected "
                        f"{vocab_sha256[:12]}…): relabel with the run's teacher")
    if made["top_k"] != top_k:
        raise StepError(f"{uri} holds top-{made['top_k']} labels but top-{top_k} were asked for: relabel with "
                        f"--top-k {top_k} or change the run's k")
    return made


def labelled_shards(uri: str, what: str) -> list[str]:
    """The labelled shards of a folder, as URIs (tfdata streams them from the store), each refused
    unless label-teacher committed it: checked before a step starts, so an unfinished shard never
    costs the step's output folder its manifest."""
    folder = open_folder(uri)
    names = [n for n in folder.list() if n.endswith(".tfrecord")]
    if not names:
        raise StepError(f"{uri} holds no labelled .tfrecord shards: label the {what} split with label-teacher first")
    shards = [folder.child_uri(n) for n in names]
    for shard in shards:
        committed_input(shard, "label-teacher", per_file=True)
    return shards
