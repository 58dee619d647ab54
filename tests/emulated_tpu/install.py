"""The install step of an emulated worker (config.tpu.install in tests): the packages of the interpreter that runs
the tests instead of PyPI, which 2 workers x several slices could not reach in a test's time.

    python -m tests.emulated_tpu.install SITE_PACKAGES [...] [--check]

Run inside the worker's fresh venv (~/vlm-jax/.venv, made as in production): adds the given site-packages folders to
it with a .pth file; with --check, then `pip install --no-index -r requirements.txt`, which passes only when every
requirement is already satisfied (as after the real install).
"""

import os
import subprocess
import sys
import sysconfig


def main(argv: list[str]) -> int:
    folders = [a for a in argv if not a.startswith("--")]
    with open(os.path.join(sysconfig.get_paths()["purelib"], "emulated-tpu-test.pth"), "w") as f:
        f.write("".join(folder + "\n" for folder in folders))
    if "--check" in argv:
        return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                               "--disable-pip-version-check", "-r", "requirements.txt"]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
