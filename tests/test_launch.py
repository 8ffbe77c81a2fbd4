"""The cluster launchers (launch/tpu_vm.sh, launch/slurm.sbatch, launch/gke/jobset.sh): shellcheck-clean, and their
dry runs print exactly the commands and environment they would use, every one ending in the same
`python -m jaxalign.main ARGS` with ARGS passed through unchanged (spaces, quotes and globs included). Without
DRY_RUN the scripts run those very commands: checked with stand-ins for gcloud / srun / kubectl / xpk on PATH
that record their arguments."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/slurm.sbatch", "launch/gke/jobset.sh"]
# Arguments that a careless launcher would split, expand or unquote.
ARGS = [
    "--config=configs/llama3_8b.py:pod",
    "--config.workdir=gs://bucket/runs/my run",
    "--config.data.input=gs://bucket/corpus/*.jsonl.gz",
    "--config.model.init_from=hf:/models/it's here",
]


def script(path, *args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "PROJECT", "ZONE")}
    return subprocess.run(
        ["bash", path, *args],
        cwd=ROOT,
        env=dict(full, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def dry_run(path, *args, **env):
    proc = script(path, *args, DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("path", SCRIPTS)
def test_shellcheck_clean(path):
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    proc = subprocess.run([shellcheck, "--external-sources", path], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_tpu_vm_dry_run():
    lines = dry_run("launch/tpu_vm.sh", "--", *ARGS, TPU_NAME="v5p-128-a", ZONE="us-east5-a", PROJECT="p1")
    where = ["--worker=all", "--zone=us-east5-a", "--project=p1"]
    tarball = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxalign-v5p-128-a.tar.gz")
    argv = [shlex.split(line) for line in lines]
    assert argv[0] == ["tar", "-C", ROOT, "-czf", tarball, "--exclude-vcs", "--exclude=./runs"] + [
        "--exclude=./.venv",
        "--exclude=__pycache__",
        ".",
    ]
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert argv[1] == [*gcloud, "scp", tarball, "v5p-128-a:jaxalign.tar.gz", *where]
    assert argv[2] == [
        *gcloud,
        "ssh",
        "v5p-128-a",
        *where,
        "--command=mkdir -p jaxalign && tar -xzf jaxalign.tar.gz -C jaxalign && cd jaxalign && "
        "python3 -m pip install -q -e . 'jax[tpu]'",
    ]
    assert argv[3][:-1] == [*gcloud, "ssh", "v5p-128-a", *where]
    remote = argv[3][-1].removeprefix("--command=")
    # What the worker's shell runs: no variables, every argument intact.
    assert shlex.split(remote) == ["cd", "jaxalign", "&&", "python3", "-m", "jaxalign.main", *ARGS]
    assert len(argv) == 4


def test_tpu_vm_requires_its_variables():
    proc = script("launch/tpu_vm.sh", "--", *ARGS, ZONE="z", DRY_RUN="1")
    assert proc.returncode != 0 and "set TPU_NAME" in proc.stderr
    proc = script("launch/tpu_vm.sh", TPU_NAME="t", ZONE="z", DRY_RUN="1")
    assert proc.returncode == 2 and "arguments after --" in proc.stderr


def test_slurm_dry_run_one_task_per_gpu_and_per_node():
    srun = ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", "jaxalign.main", *ARGS]
    (line,) = dry_run("launch/slurm.sbatch", "--", *ARGS, SLURM_GPUS_ON_NODE="8")
    assert shlex.split(line) == [srun[0], "--ntasks-per-node=8", *srun[1:]]
    env_line, line = dry_run("launch/slurm.sbatch", "--", *ARGS, TASKS_PER="node", GPUS_PER_NODE="4")
    assert env_line == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"  # the process drives all 4 GPUs of its node
    assert shlex.split(line) == [srun[0], "--ntasks-per-node=1", *srun[1:]]
    proc = script("launch/slurm.sbatch", "--", *ARGS, TASKS_PER="socket", DRY_RUN="1")
    assert proc.returncode == 2 and "TASKS_PER=socket must be gpu or node" in proc.stderr


def jobset(*args, **env):
    lines = dry_run("launch/gke/jobset.sh", "--", *args, IMAGE="img:1", **env)
    assert lines[-2:] == ["---", "# kubectl apply -f -"]
    return "\n".join(lines[:-2]) + "\n"


def test_gke_jobset_manifest():
    manifest = yaml.safe_load(jobset(*ARGS))
    assert manifest["kind"] == "JobSet" and manifest["spec"]["failurePolicy"]["maxRestarts"] == 3
    (rjob,) = manifest["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # 4x4x4 chips / 4 per host
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "4x4x4",
    }
    (container,) = pod["containers"]
    assert container["image"] == "img:1"
    assert container["command"] == ["python", "-m", "jaxalign.main", *ARGS]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["env"] == [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # one slice: no MEGASCALE_*

    two = yaml.safe_load(
        jobset(*ARGS, NUM_SLICES="2", TPU_TOPOLOGY="8x16", TPU_ACCELERATOR="tpu-v5-lite-podslice")
    )
    (rjob,) = two["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2 and rjob["template"]["spec"]["parallelism"] == 32
    env = {e["name"]: e for e in rjob["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "jaxalign-slice-0-0.jaxalign"
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['jobset.sigs.k8s.io/job-index']"
    )


def test_gke_committed_manifest_is_the_scripts_rendering():
    committed = open(os.path.join(ROOT, "launch/gke/jobset.yaml")).read()
    header = [line for line in committed.splitlines() if line.startswith("#")][:2]
    # The header names the exact command that renders the file.
    command = shlex.split(header[0].removeprefix("# Rendered by: ").rstrip("\\") + header[1].lstrip("#"))
    image = command[0].removeprefix("IMAGE=")
    rendered = dry_run(command[1], *command[2:], IMAGE=image)
    body = committed.split("\n", 3)[3]  # after the three header lines
    assert body.strip() == "\n".join(rendered[:-2]).strip()


def test_gke_xpk_dry_run():
    (line,) = dry_run(
        "launch/gke/jobset.sh", "--xpk", "--", *ARGS, IMAGE="img:1", CLUSTER="c1", NUM_SLICES="2", ZONE="z1"
    )
    argv = shlex.split(line)
    assert argv[:-2] == [
        "xpk",
        "workload",
        "create",
        "--cluster=c1",
        "--workload=jaxalign",
        "--docker-image=img:1",
        "--tpu-type=v5p-128",
        "--num-slices=2",
        "--max-restarts=3",
    ]
    assert shlex.split(argv[-2].removeprefix("--command=")) == ["python", "-m", "jaxalign.main", *ARGS]
    assert argv[-1] == "--zone=z1"


@pytest.fixture
def recording_path(tmp_path):
    """A PATH whose gcloud / srun / kubectl / xpk record their argv (NUL-separated) and stdin to tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "srun", "kubectl", "xpk"):
        stub = bin_dir / tool
        stub.write_text(
            f'#!/bin/bash\n{{ printf "%s\\0" {tool} "$@"; printf "\\n"; }} >> "{tmp_path}/calls"\n'
            f'[[ -t 0 ]] || cat > "{tmp_path}/stdin"\n'
        )
        stub.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def calls(tmp_path):
    text = (tmp_path / "calls").read_text()
    return [line.rstrip("\0").split("\0") for line in text.splitlines()]


@pytest.mark.parametrize(
    "path, args, env, stdin",
    [
        ("launch/tpu_vm.sh", ARGS, dict(TPU_NAME="t", ZONE="z", SKIP_INSTALL="1"), False),
        ("launch/slurm.sbatch", ARGS, dict(GPUS_PER_NODE="8"), False),
        ("launch/gke/jobset.sh", ["--xpk", "--", *ARGS], dict(IMAGE="img:1", CLUSTER="c"), False),
        ("launch/gke/jobset.sh", ARGS, dict(IMAGE="img:1"), True),
    ],
)
def test_without_dry_run_the_printed_commands_run(tmp_path, recording_path, path, args, env, stdin):
    printed = [line for line in dry_run(path, *args, **env) if not line.startswith(("#", "---"))]
    proc = script(path, *args, PATH=recording_path, **env)
    assert proc.returncode == 0, proc.stderr
    if stdin:  # the manifest went to kubectl apply -f -
        assert calls(tmp_path) == [["kubectl", "apply", "-f", "-"]]
        assert (tmp_path / "stdin").read_text() == "\n".join(printed) + "\n"
    else:
        assert calls(tmp_path) == [shlex.split(line) for line in printed]
