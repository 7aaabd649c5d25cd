"""``python -m bench.pipeline_server --run RUN --port P``: the server a user would write without edgetune's export.

A transformers ``pipeline("text-classification")`` on the eager PyTorch adapter model (RUN/adapter, loaded with
export.eager.load_adapter_model) behind Starlette/uvicorn, with the same contract as ``python -m serve``: ``POST
/predict`` ``{"texts": [...], "top_k": 1}`` -> ``{"predictions": [{"label", "score", "top"}]}`` and ``GET /health``.
Each request runs the pipeline on its own texts in Starlette's thread pool: no batching across requests, default
torch threads. The load test's baseline (bench/loadtest.py); not part of serve/.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from transformers import AutoTokenizer, PreTrainedModel, pipeline  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from adapters.config import run_config  # noqa: E402
from adapters.eager import load_adapter_model  # noqa: E402

log = logging.getLogger("edgetune.pipeline_server")


def adapter_pipeline(run_dir: Path):
    """The text-classification pipeline on the run's eager adapter model, and the tokenizer's max length.

    ``load_adapter_model`` returns a PrefixModel (a torch ``nn.Module`` holding the transformers model, with the prefix
    or prompt passed in at forward time), which ``pipeline()`` cannot take: it needs a ``PreTrainedModel`` whose forward
    returns ``.logits``. ``AdapterClassifier`` is that thin wrapper; the pipeline then tokenises, pads, runs the model
    under ``torch.inference_mode`` and applies the softmax itself.
    """
    eager = load_adapter_model(run_dir / "adapter")
    if eager.base.config.problem_type not in (None, "single_label_classification") or eager.crf is not None:
        raise SystemExit("error: the pipeline server serves sequence classifiers only")

    class AdapterClassifier(PreTrainedModel):
        config_class = type(eager.base.config)
        base_model_prefix = "adapter"
        _supports_sdpa = _supports_attention_backend = True  # the wrapper itself runs no attention: accept any setting

        def __init__(self, model) -> None:
            super().__init__(copy.deepcopy(model.base.config))  # a copy: PreTrainedModel may adjust its config
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return SequenceClassifierOutput(logits=self.model(input_ids, attention_mask, token_type_ids))

    max_length = run_config(run_dir).max_length
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")  # the export's copy of the base model's tokenizer
    hf_logging.set_verbosity_error()  # "AdapterClassifier is not supported for text-classification": it is, by the above
    try:
        pipe = pipeline("text-classification", model=AdapterClassifier(eager).eval(), tokenizer=tokenizer, device="cpu")
    finally:
        hf_logging.set_verbosity_warning()
    return pipe, max_length


def create_app(pipe, max_length: int, num_labels: int):
    def classify(texts: list[str], top_k: int) -> list[dict]:
        # one forward over the request's texts (batch_size: the pipeline would otherwise run them one by one)
        out = pipe(texts, top_k=top_k, truncation=True, max_length=max_length, batch_size=len(texts))
        return [{"label": top[0]["label"], "score": top[0]["score"], "top": top} for top in out]

    async def predict(request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
            texts = payload["texts"] if isinstance(payload, dict) else None
            texts = [texts] if isinstance(texts, str) else texts
            top_k = payload.get("top_k", 1)
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                return JSONResponse({"error": '"texts" must be a non-empty list of strings'}, status_code=400)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                return JSONResponse({"error": '"top_k" must be a positive integer'}, status_code=400)
            results = await run_in_threadpool(classify, texts, min(top_k, num_labels))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            return JSONResponse({"error": 'send {"texts": ["..."]}'}, status_code=400)
        except Exception as e:  # the one boundary: log it, answer 500, keep serving
            log.exception("predict failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"predictions": results})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline_server", description=__doc__)
    ap.add_argument("--run", default="runs/default", help="run folder with adapter/ and export/ (for the tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    args = ap.parse_args(argv)
    pipe, max_length = adapter_pipeline(Path(args.run))
    pipe(["warm up"], truncation=True, max_length=max_length)
    app = create_app(pipe, max_length, pipe.model.config.num_labels)
    print(f"serving {args.run}/adapter (eager PyTorch, transformers pipeline) at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
