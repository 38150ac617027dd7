"""Reference systems that ``gateway_overhead.py`` measures beside xpuflow: nginx, vllm-router, LiteLLM.

Each starts in its own process session on a free loopback port before one upstream, and is stopped by
its process id (``_common.stop_process``); what was run goes into the results.

- nginx (Debian's ``nginx-light``): one worker, an ``upstream`` block with ``keepalive``, HTTP/1.1 to the
  upstream with the ``Connection`` header cleared, no proxy buffering (so streams pass through as they
  come), access log off; config, pid file, error log and temporary folders in a folder of its own. It
  needs no privileges (when started as root, its worker drops to nginx's default user as usual).
- vllm-router (the Rust router from PyPI, pinned): installed on first use into a virtual environment of
  its own under the cache folder, like the LiteLLM proxy; ``--policy round_robin`` by default. It probes
  ``GET /health`` of its worker, which the mock upstream answers.
- the LiteLLM proxy: installed on first use into a virtual environment of its own (``start_litellm``,
  also used by ``reliability.py``).

A system that cannot run here raises ``AnchorUnavailable`` with what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import free_port, start_process

LITELLM_SPEC = "litellm[proxy]"
LITELLM_CONFIG = """\
model_list:
  - model_name: chat
    litellm_params:
      model: openai/mock
      api_base: {upstream}/v1
      api_key: sk-mock
      max_retries: 0
general_settings:
  master_key: {master_key}
litellm_settings:
  num_retries: 0
  request_timeout: 30
  set_verbose: false
  telemetry: false
router_settings:
  num_retries: 0
"""
VLLM_ROUTER_SPEC = "vllm-router==0.1.17"
NGINX_INSTALL = "install Debian's nginx-light (apt-get install nginx-light) or put nginx on PATH"

NGINX_CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;

    upstream model_server {{
        server {upstream_host_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://model_server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class AnchorUnavailable(RuntimeError):
    """A reference system cannot run on this machine; the message says what to install."""


def nginx_config(upstream: str, port: int, folder: Path) -> str:
    """The nginx config text for a proxy on ``127.0.0.1:port`` before ``upstream`` (``http://host:port``),
    every file it writes inside ``folder``."""
    host_port = upstream.removeprefix("http://").rstrip("/")
    return NGINX_CONFIG.format(folder=folder, upstream_host_port=host_port, port=port)


def start_nginx(upstream: str) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """nginx before ``upstream``, in the foreground with one worker; returns the process (its folder in
    ``proc.config_dir``, for the caller to remove), its base URL and what was run."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if binary is None:
        raise AnchorUnavailable(f"nginx not found: {NGINX_INSTALL}")
    version = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, timeout=30, check=False
    ).stderr.strip()
    folder = Path(tempfile.mkdtemp(prefix="nginx-bench-"))
    port = free_port()
    text = nginx_config(upstream, port, folder)
    (folder / "nginx.conf").write_text(text)
    argv = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
    url = f"http://127.0.0.1:{port}"
    try:
        proc = start_process(argv, f"{url}/v1/models", timeout_s=30)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    proc.config_dir = folder  # type: ignore[attr-defined]
    info = {"version": version, "argv": ["nginx", *argv[1:]], "config": text.replace(str(folder), "DIR")}
    return proc, url, info


def vllm_router_venv(venv: Path) -> tuple[Path, str]:
    """The ``vllm-router`` launcher in ``venv`` (``VLLM_ROUTER_SPEC`` installed there on first use) and
    its version."""
    binary, python = venv / "bin" / "vllm-router", venv / "bin" / "python"
    if not binary.exists():
        print(f"installing {VLLM_ROUTER_SPEC} into {venv} (first run only) ...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", VLLM_ROUTER_SPEC],
                check=True,
                timeout=1800,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(venv, ignore_errors=True)  # so the next run tries again from scratch
            detail = getattr(exc, "stderr", b"") or b""
            raise AnchorUnavailable(
                f"could not install {VLLM_ROUTER_SPEC} into {venv} ({exc}; "
                f"{detail.decode(errors='replace')[-500:]}): pip install {VLLM_ROUTER_SPEC} there by hand"
            ) from exc
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-router'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    return binary, version


def start_vllm_router(
    upstream: str, venv: Path, policy: str = "round_robin"
) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """vllm-router before ``upstream`` as its one worker, warnings-only logging; returns the process
    once it reports ready (its worker healthy), its base URL and what was run."""
    binary, version = vllm_router_venv(venv)
    port = free_port()
    argv = [str(binary), "--worker-urls", upstream, "--policy", policy]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    proc = start_process(argv, f"{url}/readiness", timeout_s=120)
    return proc, url, {"version": version, "argv": ["vllm-router", *argv[1:]], "spec": VLLM_ROUTER_SPEC}


def litellm_venv(venv: Path) -> tuple[Path, str]:
    """The LiteLLM proxy binary in ``venv`` (installed there on first use) and its version; also used
    by ``reliability.py``."""
    binary, python = venv / "bin" / "litellm", venv / "bin" / "python"
    if not binary.exists():
        print(f"installing {LITELLM_SPEC} into {venv} (first run only) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", LITELLM_SPEC],
            check=True,
            timeout=1800,
            capture_output=True,
        )
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    return binary, version


def start_litellm(
    config_text: str, venv: Path, api_key: str
) -> tuple[subprocess.Popen[bytes], int, dict[str, Any]]:
    """Start the LiteLLM proxy (one worker, error-level logs, no price-list fetch) on a free port with
    ``config_text`` as its config; the config folder goes with the process (``proc.config_dir``).
    Returns the process, its port and what was run (the key redacted). Used by reliability.py too."""
    binary, version = litellm_venv(venv)
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="litellm-bench-")) / "config.yaml"
    config.write_text(config_text)
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
        "LITELLM_TELEMETRY": "False",
    }
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    try:
        proc = start_process(argv, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=240, env=env)
    except BaseException:
        shutil.rmtree(config.parent, ignore_errors=True)
        raise
    proc.config_dir = config.parent  # type: ignore[attr-defined]  # removed with the process
    info = {
        "version": version,
        "config": config_text.replace(api_key, "<the run's key>"),
        "argv": ["litellm", *argv[1:]],
        "env": {k: env[k] for k in ("LITELLM_LOG", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_TELEMETRY")},
    }
    return proc, port, info
