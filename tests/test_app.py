"""``ovseg app``: a real HTTP round trip through Gradio's client against a server on 127.0.0.1 returns
the label map ``model.segment`` gives; without Gradio the command says what to install."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spawn_ranks import free_port  # tests/spawn_ranks.py

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def tiny_model(seed: int = 0):
    from ovseg.encoders.text_transformer import CLIPTextTransformer
    from ovseg.encoders.timm_vit import TimmViT
    from ovseg.methods.simzss import SimZSS

    torch.manual_seed(seed)
    return SimZSS(TimmViT.tiny(), CLIPTextTransformer.tiny(output_dim=64), print_metrics=False).eval()


@pytest.mark.timeout(120)
def test_app_round_trip_returns_the_label_map_of_segment(tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from ovseg.app import app_vocabulary, build_app

    image = tmp_path / "photo.jpg"
    rotated = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 8  # shown rotated: 56 high, 40 wide
    rotated.save(image, exif=exif, quality=95)
    models = {"first": tiny_model(0), "second": tiny_model(1)}
    demo = build_app(models)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for name, threshold in (("first", 0.0), ("second", 0.4)):
            overlay, table, label_file = client.predict(
                handle_file(str(image)), "square, circle|disc, triangle", "single", threshold, name, api_name="/segment"
            )
            labels = np.asarray(Image.open(label_file))
            vocabulary = app_vocabulary("square, circle|disc, triangle", "single", threshold)
            expected = models[name].segment(image, vocabulary)[0].numpy()
            assert labels.shape == (56, 40)
            assert np.array_equal(labels, expected), name
            assert len(vocabulary) == (4 if threshold else 3)
            counts = np.bincount(expected.reshape(-1), minlength=len(vocabulary))
            assert [row[0] for row in table["data"]] == [
                vocabulary.display_names[k] for k in np.argsort(-counts, kind="stable") if counts[k]
            ]
            assert Image.open(overlay).width > 40  # image and legend
        first, second = (
            np.asarray(
                Image.open(
                    client.predict(handle_file(str(image)), "square, circle", "single", 0.0, name, api_name="/segment")[
                        2
                    ]
                )
            )
            for name in ("first", "second")
        )
        assert not np.array_equal(first, second)  # the menu selects the model
    finally:
        demo.close()


def test_app_vocabulary_adds_a_background_class_only_with_a_threshold():
    from ovseg.app import app_vocabulary

    assert app_vocabulary("sky, tv|monitor").classes == (("sky",), ("tv", "monitor"))
    with_background = app_vocabulary("sky, grass", "imagenet80", 0.25)
    assert with_background.display_names == ("background", "sky", "grass")
    assert with_background.background_threshold == 0.25 and len(with_background.templates) == 80
    with pytest.raises(ValueError, match="class name"):
        app_vocabulary(" , ")


def test_app_without_gradio_says_what_to_install(monkeypatch):
    from ovseg.cli import run

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        run(["app", "--ckpt_path", "missing.ckpt"])
    assert str(exit_info.value.code) == "ovseg app needs Gradio: pip install 'ovseg[app]' (or pip install gradio)"


def test_app_with_a_missing_checkpoint_gives_one_line(tmp_path):
    pytest.importorskip("gradio")
    from ovseg.app import main

    with pytest.raises(SystemExit, match=f"ovseg app: checkpoint {tmp_path / 'none.ckpt'} does not exist"):
        main(["--ckpt_path", str(tmp_path / "none.ckpt")])
