"""The fill-mask pyfunc behind MLflow's own scoring server: a bad request is a 400 that says what to fix.

The model is the real one publish logs (serving.log_fill_mask, into a sqlite store), around a tiny
BERT's ONNX exports, and it is served by the app `mlflow models serve` runs
(mlflow.pyfunc.scoring_server.init), in process: the refusal's body is what a caller reads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertdistill.tokenization import SPECIAL_TOKENS

tf = pytest.importorskip("tensorflow")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("httpx")  # fastapi's TestClient

WORDS = ["the", "capital", "of", "paris", "is", "france", "word", "##s", "."]


def _tiny_onnx(folder, vocab_size: int) -> None:
    """A one-layer BERT of random weights as the student's ONNX exports (fp32 and int8): enough to
    serve, nothing to train."""
    from bertdistill import onnx_model
    from bertdistill.bert.config import BertConfig
    from bertdistill.bert.model import initial_value, variable_shapes

    config = BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16)
    rng = np.random.default_rng(0)
    weights = {n: initial_value(n, shape, config, rng) for n, shape in variable_shapes(config).items()}
    folder.mkdir()
    onnx_model.save(onnx_model.build(config, weights), folder / onnx_model.FP32)
    onnx_model.quantize(folder / onnx_model.FP32, folder / onnx_model.INT8)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    from bertdistill.serving import log_fill_mask

    root = tmp_path_factory.mktemp("serving")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, *WORDS]) + "\n")
    _tiny_onnx(root / "onnx", len(SPECIAL_TOKENS) + len(WORDS))
    (root / "huggingface").mkdir()
    # the store through the environment, undone after: mlflow.set_tracking_uri would pin it for every later test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        # artifacts under the test's folder (the sqlite store's default experiment would use ./mlruns)
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_fill_mask(root, vocab, "tiny-fill-mask", {"serves": "int8", "int8_minus_fp32_points": 0.0})
        model = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "true")  # init sets it; undone after the module
        with TestClient(scoring_server.init(model)) as test_client:
            yield test_client


def _post(client, body: dict):
    return client.post("/invocations", content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_a_good_request_is_answered(client):
    response = _post(client, {"inputs": {"text": ["paris is the capital of [MASK]."]}, "params": {"top_k": 2}})
    assert response.status_code == 200, response.text
    [answer] = response.json()["predictions"]
    assert answer["text"] == "paris is the capital of [MASK]." and [len(m) for m in answer["masks"]] == [2]


LONG = "paris is the capital of france " * 100 + "[MASK]."


@pytest.mark.parametrize("body, says", [
    ({"inputs": {"text": ["the [MASK] of france.", "paris is the capital of france."]}},
     "text 2 has no [MASK] ('paris is the capital of france.'): put [MASK] where the model should fill in a word"),
    ({"inputs": {"text": [""]}}, "text 1 is empty: send a sentence with [MASK]"),
    ({"inputs": {"text": [LONG]}}, "is 604 word pieces with [CLS] and [SEP]; the model takes at most 512: shorten"),
    ({"inputs": {"text": ["the [MASK]."]}, "params": {"top_k": 0}}, "top_k 0 is not a whole number from 1 to 14"),
    ({"inputs": {"text": ["the [MASK]."]}, "params": {"top_k": 100}}, "top_k 100 is not a whole number from 1 to"),
    ({"inputs": {"words": ["the [MASK]."]}}, 'the request has no texts: send them as a column named text, e.g. {"'),
    ({"dataframe_records": [{"text": "the [MASK]."}, {}]}, "text 2 is empty"),
])
def test_a_bad_request_is_a_400_that_says_what_to_fix(client, body, says):
    response = _post(client, body)
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text and "stack_trace" not in response.text
    message = response.json()["message"]
    assert says in message, message
    assert "\n" not in message, message


def test_a_top_k_that_is_not_a_number_is_refused_by_mlflow_without_a_trace(client):
    """MLflow checks params against the signature before predict runs: its own 400, naming top_k and the value
    (after its "Failed to predict data ..." preamble), still without a stack trace."""
    response = _post(client, {"inputs": {"text": ["the [MASK]."]}, "params": {"top_k": "many"}})
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text and "stack_trace" not in response.text
    message = response.json()["message"]
    assert "top_k" in message and "many" in message and "long" in message, message
