"""SphereAR demo: the Hugging Face Space entry point (``python app.py``), written by ``sphere-ar space``.

It serves MODEL with the Gradio demo of ``sphere_ar_hf/`` beside this file: a copy of the sphere-ar-hf package's
module files (unchanged), imported before any installed copy, so the Space needs only ``requirements.txt``. MODEL
is a Hub repository id (downloaded when the app starts) or a pipeline folder beside this file (``model``).

    python app.py                    # http://127.0.0.1:7860
    python app.py --port 8080        # the demo's options: --max-images, --max-steps, --steps, --device, --dtype, ...
    python app.py --help

On a Space, GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT are set by the platform and become the defaults of
--host and --port; elsewhere the demo binds 127.0.0.1 only. On ZeroGPU hardware, the `spaces` package (installed on
every Gradio Space) is imported first, before torch, and each request gets a GPU for at most --gpu-duration
seconds (default: the Space variable SPHERE_AR_GPU_DURATION, else 60); on other hardware, and where `spaces` is
not installed, nothing changes.
"""

import os
import sys
from pathlib import Path

try:  # first: on ZeroGPU it must come before torch initialises CUDA; the demo then asks for a GPU per request
    import spaces  # noqa: F401
except ImportError:  # not a Space
    pass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check

HERE = Path(__file__).resolve().parent
MODEL = "{{ model }}"  # filled in by `sphere-ar space`
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # this folder's sphere_ar_hf/ first (`python app.py` puts it first anyway)

from sphere_ar_hf.demo import main  # noqa: E402


def served_model() -> str:
    """MODEL as ``--model`` takes it: the folder beside this file if there is one, else the Hub repository id."""
    folder = HERE / MODEL
    return str(folder) if (folder / "model_index.json").is_file() else MODEL


if __name__ == "__main__":
    sys.exit(main(["--model", served_model(), *sys.argv[1:]]))
