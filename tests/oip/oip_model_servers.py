"""Real Open Inference Protocol servers for the tests, each from its own cached venv (``oip_venvs``),
listening on 127.0.0.1 (REST and gRPC):

- MLServer 1.7 with ``mlserver-sklearn``, serving ``iris``: a logistic regression trained at start-up
  in MLServer's venv on scikit-learn's bundled iris data (FP64 ``input-0`` [-1, 4] -> INT64 ``predict``);
- a kserve 0.21 ``ModelServer`` serving ``kembed``: a custom ``kserve.Model`` that embeds texts (BYTES
  ``text`` [-1] -> FP32 ``embedding`` [-1, 8], the first 8 bytes of each text's SHA-256 / 255).

    with mlserver(tmp) as server:         # server.rest "http://127.0.0.1:P", server.grpc "127.0.0.1:G"
        ...

Both are stopped with SIGTERM (SIGKILL after 15 s), by the PID this code started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oip_serve import free_port
from oip_venvs import KSERVE_REQUIREMENTS, MLSERVER_REQUIREMENTS, server_venv

TRAIN_IRIS = """
import json, sys, joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
x, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=500).fit(x, y)
joblib.dump(model, sys.argv[1] + "/model.joblib")
sample = x[::15]
with open(sys.argv[1] + "/expected.json", "w") as out:
    json.dump({"x": sample.tolist(), "y": model.predict(sample).tolist()}, out)
"""

KSERVE_EMBED = """
import hashlib, sys
import grpc.aio._server as grpc_server
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

# kserve 0.21 listens on every address; these tests keep it on the loopback
_config_init = uvicorn.Config.__init__
def _loopback_config(self, *args, **kwargs):
    kwargs["host"] = "127.0.0.1"
    _config_init(self, *args, **kwargs)
uvicorn.Config.__init__ = _loopback_config
_add_port = grpc_server.Server.add_insecure_port
grpc_server.Server.add_insecure_port = lambda self, addr: _add_port(self, addr.replace("[::]", "127.0.0.1"))


class Embed(Model):
    def __init__(self, name):
        super().__init__(name)
        self.ready = True

    def get_input_types(self):
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self):
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, 8]}]

    async def predict(self, payload, headers=None, response_headers=None):
        values = payload.inputs[0].as_numpy().reshape(-1)  # REST data or gRPC raw contents alike
        texts = [t.encode() if isinstance(t, str) else bytes(t) for t in values]
        flat = [b / 255.0 for t in texts for b in hashlib.sha256(t).digest()[:8]]
        out = InferOutput(name="embedding", shape=[len(texts), 8], datatype="FP32", data=flat)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "")


ModelServer(http_port=int(sys.argv[1]), grpc_port=int(sys.argv[2]), workers=1, enable_grpc=True).start(
    [Embed("kembed")]
)
"""


@dataclass(frozen=True)
class ModelServerProcess:
    rest: str
    grpc: str
    pid: int
    log: Path
    expected: dict[str, Any]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"model server not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def _run(argv: list[str], cwd: Path, ready_url: str, log: Path, timeout_s: float) -> Iterator[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_ready(proc, ready_url, log, timeout_s)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@contextmanager
def mlserver(tmp: Path, *, timeout_s: float = 180.0) -> Iterator[ModelServerProcess]:
    python = server_venv("mlserver", MLSERVER_REQUIREMENTS)
    model_dir = tmp / "iris"
    model_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), "-c", TRAIN_IRIS, str(model_dir)], check=True, timeout=120)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (tmp / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}],
                "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
                "parameters": {"uri": "./model.joblib"},
            }
        )
    )
    log = tmp / "mlserver.log"
    argv = [str(python.parent / "mlserver"), "start", str(tmp)]
    with _run(argv, tmp, f"http://127.0.0.1:{http_port}/v2/models/iris/ready", log, timeout_s) as pid:
        expected = json.loads((model_dir / "expected.json").read_text())
        yield ModelServerProcess(
            f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", pid, log, expected
        )


@contextmanager
def kserve_server(tmp: Path, *, timeout_s: float = 120.0) -> Iterator[ModelServerProcess]:
    python = server_venv("kserve", KSERVE_REQUIREMENTS)
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "kserve_embed.py"
    script.write_text(KSERVE_EMBED)
    http_port, grpc_port = free_port(), free_port()
    log = tmp / "kserve.log"
    argv = [str(python), str(script), str(http_port), str(grpc_port)]
    with _run(argv, tmp, f"http://127.0.0.1:{http_port}/v2/models/kembed/ready", log, timeout_s) as pid:
        yield ModelServerProcess(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", pid, log, {})
