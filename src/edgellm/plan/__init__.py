"""Planning: will a model fit a device, how fast will it run, with which quantization.

`catalog` holds the devices (a TOML data file users extend), `arch` the model numbers (from a
GGUF or the table of known sizes), `estimate` the memory arithmetic and the rooflines, and
`measure` the short tests that calibrate the rooflines on the machine at hand.
"""
