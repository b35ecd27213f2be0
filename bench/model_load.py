"""Load time of the default model: as a file, as a plain registry version, as an encrypted one.

Each round opens the model as `edgellm serve` does (`edgellm.serving.open_source`: re-hashing a
plain version, decrypting an encrypted one into a memfd) and has llama.cpp load it; the median
of the rounds is printed for opening alone and for opening + loading. A throwaway registry is
made in a temporary directory. Run it with nothing else busy:

    PYTHONPATH=. .venv/bin/python bench/model_load.py --rounds 4

`--cold` also times a plain file llama.cpp has never mapped (freshly written, and after the
page cache is dropped: needs root), which is what an encrypted model costs every time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from edgellm.backends import load_backend
from edgellm.modelfile import default_model_path
from edgellm.registry import Registry
from edgellm.registry.crypto import keygen
from edgellm.serving import open_source
from edgellm.settings import EngineSettings, ServerSettings

ENGINE = EngineSettings(ctx=4096, parallel=4)


def timed(model: Path, key: Path | None = None) -> tuple[float, float]:
    """(opening, opening + loading) seconds."""
    start = time.perf_counter()
    source = open_source(ServerSettings(model=model, model_key_file=key))
    opened = time.perf_counter() - start
    backend = load_backend(source.path, ENGINE)
    total = time.perf_counter() - start
    backend.close()
    if source.memory is not None:
        source.memory.close()
    return opened, total


def load_once(path: Path) -> float:
    start = time.perf_counter()
    load_backend(path, ENGINE).close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cold", action="store_true", help="also time never-mapped files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        home, key = Path(scratch) / "home", Path(scratch) / "model.key"
        os.environ["EDGELLM_HOME"] = str(home)
        keygen(key)
        with Registry.open(home) as registry:
            registry.add_file(default_model_path(), "plain")
            secret = bytes.fromhex(key.read_text().strip())
            registry.add_file(default_model_path(), "secret", encrypt_key=secret)
        cases = {
            "file": (default_model_path(), None),
            "plain registry version": (Path("plain"), None),
            "encrypted registry version": (Path("secret"), key),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (model, model_key) in cases.items():
                times[name].append(timed(model, model_key))
        for name, rounds in times.items():
            opened = statistics.median(r[0] for r in rounds)
            total = statistics.median(r[1] for r in rounds)
            print(f"{name:<28} open {opened:6.3f} s   open + load {total:6.3f} s")
        if args.cold:
            fresh = Path(scratch) / "fresh.gguf"
            shutil.copy(default_model_path(), fresh)
            print(f"{'freshly written file':<28} load {load_once(fresh):6.3f} s")
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            print(f"{'after dropping the cache':<28} load {load_once(fresh):6.3f} s")


if __name__ == "__main__":
    main()
