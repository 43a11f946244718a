"""The model card (README.md of the Hugging Face folder): what the student is, where it came from,
how good and how fast it is, each figure beside its baseline, all read from evaluate's report.

Why in the folder rather than only in MLflow: the folder is what travels (copied to a hub, a
bucket, another team's repository), and a card is how the people who load it learn that its
weights come from Wikipedia text under CC BY-SA, how it compares with the model it was distilled
from and with the same student trained without it, and which of its exports to serve.
"""

from __future__ import annotations

from bertdistill.bert.hf_folder import model_card

DATA_LICENSE = "CC BY-SA 4.0 (Wikipedia's text license; the weights are trained on it)"


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def _gain(g: dict) -> str:
    return (f"{g['mlm_accuracy'] * 100:+.2f} points (95% interval {g['ci95_low'] * 100:+.2f} to "
            f"{g['ci95_high'] * 100:+.2f})")


def speed_rows(report: dict) -> list[tuple[str, float, float]]:
    """(model, seconds per batch, x the teacher) for every model evaluate timed in the same rounds."""
    teacher = report["teacher"]["latency_mlm_s"]
    rows = [("teacher, TensorFlow fp32", teacher), ("student, TensorFlow fp32", report["student"]["latency_mlm_s"])]
    for precision in ("fp32", "int8"):
        if precision in report.get("onnx", {}):
            rows.append((f"student, ONNX Runtime {precision}", report["onnx"][precision]["latency_mlm_s"]))
    return [(name, seconds, teacher / seconds) for name, seconds in rows]


def render(report: dict, model_name: str, run: dict[str, str], batch: int) -> str:
    """README.md: YAML front matter (license, data, tags, base model), then the card in markdown.
    `run` is the pipeline's parameters (wiki, date, steps...; empty outside a tracked run)."""
    s, t = report["student"], report["teacher"]
    dump = f"{run.get('wiki', 'enwiki')} {run.get('date', '')}".strip()
    front = {"license": "cc-by-sa-4.0", "language": ["en"], "library_name": "transformers",
             "pipeline_tag": "fill-mask", "tags": ["bert", "distillation", "wikipedia", "onnx"],
             "datasets": ["wikipedia"]}
    teacher = f", {run['teacher']}" if run.get("teacher") else ""
    lines = [f"# {model_name}", "",
             f"A {s['layers']}-layer BERT ({s['parameters'] / 1e6:.1f} M parameters) distilled from a "
             f"{t['layers']}-layer teacher ({t['parameters'] / 1e6:.1f} M{teacher}) on the Wikipedia dump {dump}, by "
             "bertdistill: masked-LM and next-sentence pretraining on the teacher's cached top-k outputs.", "",
             "## License", "",
             f"Data and weights: {DATA_LICENSE}. Attribute Wikipedia's contributors when you redistribute.", "",
             "## Held-out results", "",
             f"Masked-LM top-1 on {report['positions']:,} masked positions of held-out articles "
             f"({report['examples']:,} examples, {report['max_seq_length']} tokens):", "",
             "| model | top-1 | top-1 outside the 10 most frequent words |", "|---|---|---|"]
    for who, label in (("student", "this student"), ("control", "the same student trained without the teacher"),
                       ("teacher", "the teacher"), ("champion", "the champion when this was evaluated"),
                       ("baseline", "always the most frequent word")):
        if who in report:
            r = report[who]
            lines.append(f"| {label} | {_pct(r['mlm_accuracy'])} | {_pct(r['mlm_accuracy_outside_top10'])} |")
    lines.append("")
    if "distillation_gain" in report:
        lines.append(f"What the teacher added (student minus control): {_gain(report['distillation_gain'])}.")
    if "gain_over_champion" in report:
        lines.append(f"Over the champion of the time: {_gain(report['gain_over_champion'])}.")
    lines += ["", report["verdict"], "", "## Speed", "",
              f"Encoder and masked-LM head, batch {batch}, {report['max_seq_length']} tokens, on the machine that "
              "evaluated it, every model timed in the same rounds (best of 15):", "",
              "| model | ms per batch | x the teacher |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1000:.1f} | {ratio:.2f} |" for name, seconds, ratio in speed_rows(report)]
    if "onnx" in report:
        o = report["onnx"]
        lines += ["", f"ONNX int8 (dynamic, per-channel) top-1 {_pct(o['int8']['mlm_accuracy'])} against fp32's "
                  f"{_pct(o['fp32']['mlm_accuracy'])} ({o['int8_minus_fp32_points']:+.2f} points); fp32's logits "
                  f"are within {o['fp32']['max_abs_logit_diff_vs_tensorflow']:.1e} of TensorFlow's. The registry "
                  f"serves {o['serves']}."]
    if run:
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in sorted(run.items())]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline",
              'fill = pipeline("fill-mask", model="path/to/this/folder")',
              'fill("paris is the capital of [MASK].")', "```", "",
              "ONNX Runtime: `model.onnx` / `model.int8.onnx` in the published `onnx/` folder take input_ids, "
              "attention_mask, token_type_ids and masked_positions (int64) and return mlm_logits at those "
              "positions and nsp_logits.", ""]
    return model_card(front, "\n".join(lines))


def teacher_card(source: str, summary: dict, max_seq_length: int) -> str:
    """README.md of an adapted teacher's Hugging Face folder: what it was made from (`source`, the teacher's
    name, not its URI: the same teacher adapted in any store gets the same bytes) and how well it predicts."""
    front = {"license": "cc-by-sa-4.0", "language": ["en"], "library_name": "transformers",
             "pipeline_tag": "fill-mask", "tags": ["bert", "teacher", "wikipedia"]}
    body = (f"# Adapted teacher\n\n{source}, given a masked-LM and a next-sentence head by bertdistill's "
            f"adapt-teacher on Wikipedia examples of {max_seq_length} tokens "
            f"({summary.get('steps', '?')} steps). Held-out masked-LM top-1 "
            f"{summary['heldout_mlm_accuracy']:.2%} (before: {summary['heldout_mlm_accuracy_before']:.2%}). "
            "The platform's students are distilled from its cached top-k outputs.\n\n"
            f"## License\n\nData and the weights' adaptation: {DATA_LICENSE}; the source model keeps its own "
            "license.\n")
    return model_card(front, body)
