"""The Dockerfile and the container scripts: hadolint, bash -n, shellcheck, and the invariants the
deployment relies on (ports, volumes, non-root user, health check, entry point, build context)."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest
from conftest import REPO_ROOT, find_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage(text: str) -> list[tuple[str, str]]:
    instrs = instructions(text)
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"Dockerfile:{i + 1}: an ignore pragma needs a comment above it saying why"
            )


def test_entrypoint_parses_and_passes_shellcheck() -> None:
    assert ENTRYPOINT.stat().st_mode & 0o111, "docker/entrypoint.sh must be executable"
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    shellcheck = find_tool("shellcheck")
    result = subprocess.run(
        [str(shellcheck), "--severity=style", str(ENTRYPOINT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_executable_in_git() -> None:
    ls = subprocess.run(
        ["git", "ls-files", "-s", "docker/entrypoint.sh"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    if ls.returncode != 0 or not ls.stdout:
        return  # not committed yet: the file mode check above covers the work tree
    assert ls.stdout.split()[0] == "100755", "commit docker/entrypoint.sh with mode 755"


def test_base_images_are_pinned_build_args() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    assert args["VARIANT"] == "gpu"
    assert args["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver"
    assert re.fullmatch(r"\d{2}\.\d{2}", args["TRITON_VERSION"]), "the Triton release is pinned (yy.mm)"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["PYTHON_VERSION"]), "the CPU base is pinned to a patch release"
    for name in ("TORCH_VERSION_GPU", "TORCH_VERSION_CPU", "PYTRITON_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[name]), f"{name} is pinned"
    froms = [a for k, a in instructions(text) if k == "FROM"]
    assert "${TRITON_IMAGE}:${TRITON_VERSION}-py3 AS base-gpu" in froms
    assert any(
        f.startswith("${PYTHON_IMAGE}:${PYTHON_VERSION}-slim") and f.endswith("AS base-cpu") for f in froms
    )
    # Multi-stage: the runtime stage copies the built environment instead of building in place.
    assert froms[-1] == "base-${VARIANT} AS runtime"
    # The CPU torch pin is the one CPU machines use.
    cpu_torch = re.search(r"^torch==(\S+)$", (REPO_ROOT / "requirements" / "cpu.txt").read_text(), flags=re.M)
    assert cpu_torch is not None and cpu_torch.group(1) == args["TORCH_VERSION_CPU"]


def test_runtime_stage_ports_volumes_user_healthcheck_entrypoint() -> None:
    stage = final_stage(DOCKERFILE.read_text())
    by_kind: dict[str, list[str]] = {}
    for keyword, args in stage:
        by_kind.setdefault(keyword, []).append(args)

    assert set(" ".join(by_kind["EXPOSE"]).split()) == {"8000", "8001", "8002", "8080"}
    assert by_kind["VOLUME"] == ['["/models/checkpoint", "/models/engine"]']
    # Non-root, numeric (Kubernetes checks runAsNonRoot against a numeric user only).
    user = by_kind["USER"][-1]
    uid_arg = re.search(r"^ARG GLMV_UID=(\d+)$", DOCKERFILE.read_text(), flags=re.M)
    assert uid_arg is not None and int(uid_arg.group(1)) >= 1000
    assert user == "${GLMV_UID}:${GLMV_UID}"

    (healthcheck,) = by_kind["HEALTHCHECK"]
    assert "triton-ready" in healthcheck and "gateway-live" in healthcheck
    assert "/opt/glmv-serve/docker/healthcheck.py" in healthcheck
    assert (REPO_ROOT / "docker" / "healthcheck.py").is_file()
    assert by_kind["ENTRYPOINT"] == ['["/opt/glmv-serve/docker/entrypoint.sh"]']
    assert by_kind["CMD"] == ['["serve"]']
    env = " ".join(by_kind["ENV"])
    for setting in (
        "GLMV_CHECKPOINT_DIR=/models/checkpoint",
        "GLMV_ENGINE_ROOT=/models/engine",
        "PATH=/opt/venv/bin",
    ):
        assert setting in env


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative, POSIX) is left out of the build context (last matching pattern wins)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        bare = pat[3:] if pat.startswith("**/") else None
        if any(
            fnmatch.fnmatchcase(prefix, pat)
            or (bare is not None and fnmatch.fnmatchcase(prefix.split("/")[-1], bare))
            for prefix in prefixes
        ):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "requirements/gpu.txt",
        "docker/entrypoint.sh",
        "docker/healthcheck.py",
        "build_engine/launcher.py",
        "engine/llm_engine.py",
        "engine/core/engine_core.py",
        "gateway/__init__.py",
        "model_repository/llm/config.pbtxt",
        "client/pyproject.toml",
        "client/glmv_client/__init__.py",
    ]
    for path in needed:
        assert not dockerignored(path, patterns), f".dockerignore leaves out {path}"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "engine/__pycache__/x.pyc",
        "runs/serve/x",
    ):
        assert dockerignored(path, patterns), f".dockerignore lets {path} into the build context"
    # Everything the Dockerfile COPYs by name is in the context.
    for src in re.findall(r"^COPY (?!--from)(\S+) ", DOCKERFILE.read_text(), flags=re.M):
        if src != ".":
            assert (REPO_ROOT / src).exists() and not dockerignored(src, patterns), src


def test_cpu_python_has_a_backend_stub_in_the_pytriton_wheel() -> None:
    """The CPU variant runs the wheel's server, whose Python backend ships stubs for Python 3.8-3.13 only."""
    version = re.search(r"^ARG PYTHON_VERSION=(\d+)\.(\d+)", DOCKERFILE.read_text(), flags=re.M)
    assert version is not None
    assert (3, 8) <= (int(version.group(1)), int(version.group(2))) <= (3, 13)


@pytest.mark.parametrize(
    "script",
    sorted(
        str(p.relative_to(REPO_ROOT))
        for p in [*REPO_ROOT.glob("scripts/*.sh"), *REPO_ROOT.glob("benchmarks/*.sh")]
    ),
)
def test_project_shell_scripts_parse_and_pass_shellcheck(script: str) -> None:
    path = REPO_ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run(
        [str(find_tool("shellcheck")), "--severity=style", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
