"""Data preparation behind ``ovseg data``: tools that write datasets (readers live in
:mod:`ovseg.datamodules`, which never imports this package).

* :mod:`~ovseg.prepare.cli`: the ``ovseg data`` commands;
* :mod:`~ovseg.prepare.shards`: COCO Captions / COCO-Stuff -> WebDataset shards;
* :mod:`~ovseg.prepare.concepts`: SimZSS concepts precomputed for COCO files and shards;
* :mod:`~ovseg.prepare.feature_cache`: a store of frozen backbone features;
* :mod:`~ovseg.prepare.check`: verify a data root against benchmark configs;
* :mod:`~ovseg.prepare.synthetic`: the synthetic world written in the real formats.
"""
