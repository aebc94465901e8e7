"""Run the project's command-line entry points (`python -m chatbot`, build_index.py, train.py) in child processes.

Each run is a separate process with its own exit status, stdin, stdout and stderr, forked from a server that
imported torch, transformers and the project once (multiprocessing's forkserver): a row of a test table then
costs what the command does, not another 10-20 s of imports.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

from chatbot.runtime import PROJECT_ROOT

PRELOAD = ["torch", "transformers", "peft", "sentence_transformers", "faiss", "gradio_client",
           "chatbot.bot", "chatbot.retriever", "chatbot.emotion", "chatbot.scoring", "chatbot.contexts"]
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(PRELOAD)


@dataclass(frozen=True)
class CliResult:
    """What a finished command left: its exit status and its two output streams."""

    code: int
    stdout: str
    stderr: str


def _run(target: str, argv: list[str], env: dict[str, str], stdin: Path | None, out: Path, err: Path) -> None:
    """In the child: wire up the streams and run `target` as `python <target>` / `python -m <target>` would."""
    os.chdir(PROJECT_ROOT)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, mode in ((0, stdin or os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        handle = os.open(path, mode)
        os.dup2(handle, fd)
        os.close(handle)
    # multiprocessing hands its children a closed stdin: give the command the one this run asked for.
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.argv = [target, *argv]
    if target.endswith(".py"):
        runpy.run_path(str(PROJECT_ROOT / target), run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


def start_cli(target: str, argv: list[str], folder: Path, stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> multiprocessing.Process:
    """Start `target` (a script path relative to the project, or a module name) with `argv` in a child process.

    Its stdout and stderr go to `folder`/stdout.txt and stderr.txt as it runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out, err, given = folder / "stdout.txt", folder / "stderr.txt", None
    for path in (out, err):
        path.write_bytes(b"")
    if stdin is not None:
        given = folder / "stdin.txt"
        given.write_bytes(stdin)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    process = CONTEXT.Process(target=_run, args=(target, argv, child_env, given, out, err))
    process.start()
    return process


def read_output(folder: Path, name: str) -> str:
    """What a run started in `folder` has written to its stdout or stderr so far."""
    return (folder / f"{name}.txt").read_bytes().decode("utf-8", errors="replace")


def run_cli(target: str, argv: list[str], folder: Path, stdin: bytes | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> CliResult:
    """Run `target` with `argv` in a child process to the end."""
    process = start_cli(target, argv, folder, stdin, env)
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"{target} {argv} ran past {timeout}s")
    return CliResult(process.exitcode, read_output(folder, "stdout"), read_output(folder, "stderr"))


def save_tiny_model(tokenizer, folder: Path) -> Path:
    """A tiny random GPT-2 saved as a model folder, for --base-model."""
    from conftest import make_tiny_gpt2

    make_tiny_gpt2(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` by relative path: compare two to prove nothing was written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_adapter_for(tokenizer, folder: Path, base_model: str) -> Path:
    """A tiny LoRA adapter whose metadata says it was trained on `base_model`."""
    from conftest import make_tiny_gpt2
    from peft import LoraConfig, get_peft_model

    from chatbot.models import save_adapter

    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    return save_adapter(get_peft_model(make_tiny_gpt2(tokenizer), lora), tokenizer, folder, base_model)
