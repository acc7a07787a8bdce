"""SphereAR demo: the Hugging Face Space entry point (`python app.py`).

A thin wrapper over ``sphere_ar_hf.demo`` (``pip install "sphere-ar-hf[demo]"``). By default it serves the digits
model bundled with the package, so it runs offline; ``--model`` takes any pipeline folder or Hub repository id:

    python app.py                                    # http://127.0.0.1:7860
    python app.py --model sphere-ar-b --port 8080    # a converted ImageNet model
    python app.py --help                             # bounds (--max-images, --max-steps), --device, --dtype, ...

On a Space, GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT are set by the platform and become the defaults of
--host and --port; elsewhere the demo binds 127.0.0.1 only.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check

from sphere_ar_hf.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
