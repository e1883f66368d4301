"""kvsurgery: calibrate, export and share checkpoints that decode with a compressed KV cache."""

__version__ = "0.1.0"
# Version of the `kvsurgery` block written into exported config.json files and of the
# calibration manifest. Bump on any change a reader of older files must know about.
FORMAT_VERSION = 1
