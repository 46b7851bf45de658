#!/usr/bin/env python3
"""Install the CPU build of torch into this Python's environment, wherever the CPU build comes from.

`pip install torch==X` from PyPI is the CUDA build on an ordinary Linux machine (several GB of nvidia wheels);
the CPU build comes from PyTorch's own CPU wheel index. Some machines cannot reach that index but have a pip
index configured that serves the CPU wheel under the same version. So this detects rather than assumes: it
asks the CPU index for torch with a short timeout, installs from it when it answers, and otherwise installs
from the configured index. Afterwards it reports which build is installed and warns loudly if it is a CUDA
build (`--require-cpu` makes that an error). Run it with the target environment's Python (`.venv/bin/python
scripts/install-torch.py`); it uses only the standard library.

Environment: KUBESPEECH_TORCH_CPU_INDEX overrides the CPU index URL (e.g. a mirror of it); set it to an
empty string to skip the CPU index and use the configured one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0
BANNER = "!" * 100


def log(message: str) -> None:
    print(f"==> install-torch: {message}", flush=True)


def cpu_index_serves_torch(index_url: str, timeout_s: float) -> bool:
    """Whether the index at ``index_url`` answers for the torch project page within ``timeout_s``."""
    if not index_url:
        return False
    url = index_url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log(f"{url} is not reachable ({exc}); using the configured pip index instead")
        return False


def pip_command(python: str, version: str, cpu_index: str | None, *, replace: bool = False) -> list[str]:
    """The pip command that installs torch==``version``: from ``cpu_index`` when given (it also serves
    torch's dependencies), else from whatever index pip is configured with. ``replace`` swaps an installed
    torch of the same version (a CUDA build) for this one, keeping the dependencies already there."""
    command = [python, "-m", "pip", "install", f"torch=={version}"]
    if cpu_index:
        command += ["--index-url", cpu_index]
    if replace:
        command += ["--force-reinstall", "--no-deps"]
    return command


def installed_build(python: str) -> dict[str, str | None] | None:
    """{"version", "cuda"} of the torch that ``python`` imports, or None when it has none."""
    probe = (
        "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda}))"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    build: dict[str, str | None] = json.loads(result.stdout.strip().splitlines()[-1])
    return build


def is_wanted(build: dict[str, str | None] | None, version: str) -> bool:
    """True for the CPU build of ``version`` (``2.13.0`` or ``2.13.0+cpu``)."""
    return build is not None and str(build["version"]).split("+")[0] == version and build["cuda"] is None


def cuda_warning(build: dict[str, str | None]) -> str | None:
    """The loud warning for a CUDA build, or None for a CPU one."""
    if build["cuda"] is None:
        return None
    return (
        f"{BANNER}\n"
        f"torch {build['version']} is a CUDA {build['cuda']} build, not the CPU build: it pulled several GB of\n"
        "nvidia wheels and the tests do not need them. PyTorch's CPU index was not used; set\n"
        "KUBESPEECH_TORCH_CPU_INDEX to a reachable copy of it, or configure pip with an index that serves\n"
        f"the CPU wheel, then run `make clean venv`.\n{BANNER}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=TORCH_VERSION, help="torch version (default: %(default)s)")
    parser.add_argument("--cpu-index", default=os.environ.get("KUBESPEECH_TORCH_CPU_INDEX", CPU_INDEX),
                        help="PyTorch's CPU wheel index (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=PROBE_TIMEOUT_S, help="seconds to wait for the index"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the environment's Python (default: this one)"
    )
    parser.add_argument(
        "--require-cpu", action="store_true", help="fail (exit 1) if a CUDA build is installed"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the pip command that would (re)install torch, without running it",
    )
    args = parser.parse_args(argv)

    build = installed_build(args.python)
    if is_wanted(build, args.version) and not args.dry_run:
        log(f"torch {build and build['version']} (CPU build) is already installed")
        return 0
    log(f"looking for torch {args.version} on PyTorch's CPU index {args.cpu_index or '(skipped)'}")
    use_cpu_index = cpu_index_serves_torch(args.cpu_index, args.timeout)
    replace = build is not None
    command = pip_command(
        args.python, args.version, args.cpu_index if use_cpu_index else None, replace=replace
    )
    if args.dry_run:
        print(" ".join(command))
        return 0
    log(("installing the CPU build from PyTorch's CPU index" if use_cpu_index else
         "installing from the configured pip index (it must serve a CPU wheel; checked afterwards)")
        + f" (~900 MB): {' '.join(command[1:])}")  # fmt: skip
    if subprocess.run(command).returncode != 0:
        if not use_cpu_index:
            return 1
        log("the CPU index failed midway; trying the configured pip index")
        if subprocess.run(pip_command(args.python, args.version, None, replace=replace)).returncode != 0:
            return 1
    build = installed_build(args.python)
    if build is None:
        log("torch does not import after the install")
        return 1
    warning = cuda_warning(build)
    if warning is None:
        log(f"installed torch {build['version']}: the CPU build (torch.version.cuda is None)")
        return 0
    print(warning, file=sys.stderr, flush=True)
    return 1 if args.require_cpu else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
