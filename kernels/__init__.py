"""llama.cpp library builds (``kernels/build.py``), shipped in the package as ``molink_lite.kernels`` so that
``molink-lite build-lib`` works from an installed package; the scripts also run from a source checkout."""
