"""An SFT run on a `data.mixture` of two files, through the real command line: killed after its step-8 checkpoint and
resumed, it ends bitwise identical to an uninterrupted run (the mixture's position is in the checkpointed data
state), and that state records the mixture."""

import json
import signal
import subprocess

import pytest

from tests.train.test_resume import ROOT, env, logged, params_bytes, stage_command


def _run(workdir, world, files, cache, expect=0, **extra_env):
    """The SFT run of tests/train/test_resume.py with `data.mixture` in place of `data.input`."""
    command = [a for a in stage_command("sft", workdir, world) if not a.startswith("--config.data.input=")]
    command.append(f"--config.data.mixture=(({files[0]!r}, 0.6), ({files[1]!r}, 0.4))")
    compile_cache = dict(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env=env(**compile_cache, **extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # three SFT runs through the command line: ~2.5 minutes on 2 shared cores
def test_sft_on_a_mixture_resumes_bitwise(small_world, tmp_path_factory):
    data = tmp_path_factory.mktemp("mixture_data")
    lines = [line for line in open(small_world["sft_train"], encoding="utf-8") if line.strip()]
    files = [str(data / "a.jsonl"), str(data / "b.jsonl")]
    for i, path in enumerate(files):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i::2])
    cache = tmp_path_factory.mktemp("mixture_cache")
    straight, killed = tmp_path_factory.mktemp("mix_straight"), tmp_path_factory.mktemp("mix_killed")
    _run(straight, small_world, files, cache)
    _run(killed, small_world, files, cache, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="8")
    proc = _run(killed, small_world, files, cache)
    assert "resumed from step 8" in proc.stdout
    assert params_bytes(killed, 12, "sft") == params_bytes(straight, 12, "sft")
    resumed, reference = logged(killed), logged(straight)
    assert resumed == reference and len({reference[s]["loss"] for s in range(8, 13)}) == 5

    saved = json.loads((straight / "config.json").read_text())
    assert saved["data"]["mixture"] == [[files[0], 0.6], [files[1], 0.4]] and saved["data"]["input"] == ""
    states = list((straight / "checkpoints" / "sft" / "12" / "data").glob("*"))
    layout = json.loads(states[0].read_bytes())["layout"]
    assert layout["files"] == [files[0]] and layout["mixture"] == [[[files[1]], 0.4]]
