"""Readers of the raw data formats, one module per format (used by `dreamjax prepare`, `data/prepare.py`).

Every module has `units(input, ctx, parts, ...) -> [Unit]` (the pieces of work) and
`read(unit, ctx, counts) -> iterator of (index, Prepared | skip reason)`; `base.py` holds what they share.
"""

from dreamjax.data.sources import llava, mmc4, pairs, synthetic, webdataset

READERS = {"mmc4": mmc4, "webdataset": webdataset, "pairs": pairs, "llava": llava, "synthetic": synthetic}
FORMATS = tuple(READERS)

__all__ = ["FORMATS", "READERS"]
