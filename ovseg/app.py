"""``ovseg app``: a web demo (Gradio) to segment an uploaded image with any class names.

    pip install "ovseg[app]"      # Gradio (installed by `make install`)
    ovseg app --ckpt_path runs/smoke/checkpoints/last.ckpt [--ckpt_path other.ckpt] [--port 7860] [--example IMG]

Upload an image, type class names (comma-separated; ``|`` between synonyms of one class), choose
the prompt templates and a background threshold (above 0, a class ``background`` is added as
label 0 and predicted where the best class probability is below it), and get the overlay with its
legend, the classes present, and the label map as a palette PNG (pixel value = class index) to
download. With several ``--ckpt_path``, a menu selects the model.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ovseg.module import OVSegModule
from ovseg.vocabulary import Vocabulary

INSTALL_HINT = "ovseg app needs Gradio: pip install 'ovseg[app]' (or pip install gradio)"
DEFAULT_CLASSES = "sky, grass, tree, a red car"


def import_gradio() -> Any:
    """The ``gradio`` module, or SystemExit with the one-line install hint."""
    try:
        import gradio
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    return gradio


def app_vocabulary(classes: str, templates: str = "single", background_threshold: float = 0.0) -> Vocabulary:
    """The vocabulary the app segments with: the typed names (``parse_classes`` syntax), preceded by a
    nameless ``background`` class 0 when ``background_threshold`` > 0."""
    from ovseg.datamodules.image_folder import parse_classes

    entries = parse_classes(classes)
    if not entries:
        raise ValueError("type at least one class name (comma-separated)")
    if background_threshold and background_threshold > 0:
        return Vocabulary.from_names([(), *entries], templates, float(background_threshold))
    return Vocabulary.from_names(entries, templates)


def segment_file(model: OVSegModule, image_path: str, vocabulary: Vocabulary, out_dir: Path) -> dict[str, Any]:
    """Segment one image file: the overlay (PIL), the label PNG's path and the classes present."""
    from ovseg.visualize import overlay, palette, save_label_png

    (result,) = model.segment_detailed(image_path, vocabulary)
    labels = result.labels.cpu()
    colours = palette(len(vocabulary), vocabulary.background_threshold is not None)
    counts, confidence = result.class_statistics(len(vocabulary))
    fractions = (counts / max(labels.numel(), 1)).numpy()
    names = vocabulary.display_names
    label_path = out_dir / f"{Path(image_path).stem}_labels.png"
    save_label_png(labels, colours, label_path)
    rows = [
        [names[k], round(100 * float(fractions[k]), 2), round(float(confidence[k]), 4)]
        for k in sorted(range(len(names)), key=lambda k: -fractions[k])
        if counts[k] > 0
    ]
    return {
        "overlay": overlay(image_path, labels, names, colours, fractions=fractions),
        "labels": str(label_path),
        "rows": rows,
    }


def build_app(models: Mapping[str, OVSegModule], example: str | None = None) -> Any:
    """The Gradio Blocks app over ``models`` (display name -> model); API name ``/segment``.
    With ``example`` (an image file), the page opens with it segmented."""
    gr = import_gradio()
    if not models:
        raise ValueError("build_app needs at least one model")
    out_root = Path(tempfile.mkdtemp(prefix="ovseg_app_"))

    def run(image_path: str | None, classes: str, templates: str, threshold: float, checkpoint: str):
        if not image_path:
            raise gr.Error("upload an image first")
        try:
            vocabulary = app_vocabulary(classes, templates, threshold)
            out_dir = Path(tempfile.mkdtemp(dir=out_root))
            result = segment_file(models[checkpoint], image_path, vocabulary, out_dir)
        except (ValueError, TypeError, OSError) as error:  # bad names, unreadable image
            raise gr.Error(str(error)) from None
        return result["overlay"], result["rows"], result["labels"]

    names = list(models)
    with gr.Blocks(title="ovseg: open-vocabulary segmentation") as demo:
        gr.Markdown(
            "## ovseg: open-vocabulary semantic segmentation\nUpload an image, type class names "
            "(comma-separated, `|` between synonyms), and press **Segment**."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    value=example, type="filepath", image_mode=None, label="image", sources=["upload", "clipboard"]
                )
                classes = gr.Textbox(value=DEFAULT_CLASSES, label="class names", lines=2)
                with gr.Row():
                    templates = gr.Radio(["single", "imagenet80"], value="single", label="prompt templates")
                    threshold = gr.Slider(
                        0.0, 1.0, value=0.0, step=0.05, label="background threshold (0: off; else label 0 = background)"
                    )
                checkpoint = gr.Dropdown(names, value=names[0], label="checkpoint", visible=len(names) > 1)
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                overlay_image = gr.Image(type="pil", label="overlay and legend", format="png")
                table = gr.Dataframe(
                    headers=["class", "pixels (%)", "confidence"], label="classes present", interactive=False
                )
                label_file = gr.File(label="label map (palette PNG, value = class index)")
        inputs, outputs = [image, classes, templates, threshold, checkpoint], [overlay_image, table, label_file]
        button.click(run, inputs, outputs, api_name="segment")
        if example:
            demo.load(run, inputs, outputs, api_name=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    """``ovseg app``: load the checkpoints and serve the demo."""
    parser = argparse.ArgumentParser(
        prog="ovseg app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt_path",
        action="append",
        required=True,
        metavar="CKPT",
        help="an ovseg checkpoint, save_pretrained folder or hf://ORG/NAME (repeat for several, selectable in the app)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--share", action="store_true", help="also create a public Gradio link")
    parser.add_argument("--example", metavar="IMAGE", help="open the page with this image segmented")
    args = parser.parse_args(argv)
    import_gradio()  # fail before loading the models
    models: dict[str, OVSegModule] = {}
    for path in args.ckpt_path:
        if not path.startswith("hf://") and not Path(path).exists():
            raise SystemExit(f"ovseg app: checkpoint {path} does not exist")
        try:  # a .ckpt of ovseg fit / convert, a save_pretrained folder, or a Hub repository
            models[path] = OVSegModule.from_pretrained(path, map_location=args.device).eval()
        except (FileNotFoundError, ValueError, TypeError) as error:
            raise SystemExit(f"ovseg app: {error}") from None
    build_app(models, args.example).launch(server_name=args.host, server_port=args.port, share=args.share)
