"""The methods of ovseg, one subpackage each, listed in :data:`METHODS`.

YAML configs name a method by its class path (``ovseg.methods.simzss.SimZSS``); ``METHODS`` is the
one explicit registry for code that needs the list (tests, docs, checkpoint checks).
"""

METHODS: dict[str, str] = {
    "simzss": "ovseg.methods.simzss.SimZSS",
    "cdt": "ovseg.methods.cdt.CDT",
    "zegformer": "ovseg.methods.zegformer.ZegFormer",
    "clip": "ovseg.methods.clip.CLIP",
}
