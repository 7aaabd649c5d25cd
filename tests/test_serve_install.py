"""`pip install .[serve]` alone, in a fresh venv without torch or transformers, installs and serves an export."""

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.helpers import ROOT, free_port


def test_serve_extra_alone_installs_and_serves(exported, tmp_path):
    export = exported("tiny", "lora") / "export"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    src = tmp_path / "src"  # a copy of the source without .venv, build/ or runs/
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "runs", ".git", "__pycache__", "*.egg-info"))
    out = subprocess.run([*pip, f"{src}[serve]"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    python = str(venv / "bin" / "python")
    code = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'peft') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "[]"
    port = free_port()
    proc = subprocess.Popen([python, "-m", "serve", "--export", str(export), "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=b'{"texts": ["hi there"]}')
                with urllib.request.urlopen(req, timeout=10) as r:
                    body = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert body is not None and body["predictions"][0]["label"], proc.stdout.read() if proc.poll() is not None else ""
    finally:
        proc.terminate()
        proc.wait(timeout=20)
