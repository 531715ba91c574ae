"""Command line: ``diffsynth info | txt2img | demo``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import Counter

import torch


def _parse_dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise SystemExit(f"--dtype must be one of fp32, fp16, bf16; got {name!r}")
    return table[name]


def cmd_info(args: argparse.Namespace) -> int:
    """Detected family, dtype(s) and parameter count of a model file, read from its header."""
    from .models.detect import detect
    from .models.state_dict import read_header

    if os.path.isdir(args.file):
        from .models.model_manager import ModelManager

        ModelManager(device="cpu").identify(args.file)
        print(f"{args.file}: diffusers model folder")
        return 0
    header = read_header(args.file)
    kind = detect(header, source=args.file)
    count = sum(_numel(shape) for shape, _ in header.values())
    dtypes = Counter(str(dtype).removeprefix("torch.") for _, dtype in header.values())
    print(f"file:       {args.file}")
    print(f"family:     {kind.family} ({kind.description}){'' if kind.supported else ' - NOT SUPPORTED: ' + kind.note}")
    print(f"dtype:      {', '.join(f'{d} ({n} tensors)' for d, n in dtypes.most_common())}")
    print(f"parameters: {count:,} in {len(header)} tensors")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cmd_txt2img(args: argparse.Namespace) -> int:
    from .models.model_manager import ModelManager
    from .pipelines.sd_image import SDImagePipeline
    from .utils.atomic import atomic_save_image

    mm = ModelManager(torch_dtype=_parse_dtype(args.dtype), device=args.device)
    mm.load_models(args.model, lora_alphas=args.lora_alpha)
    if args.textual_inversion_folder:
        mm.load_textual_inversions(args.textual_inversion_folder)
    pipe = SDImagePipeline.from_model_manager(mm)
    torch.manual_seed(args.seed)
    image = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        cfg_scale=args.cfg,
        clip_skip=args.clip_skip,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save_image(image, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Self-check of the install: a tiny seeded random-weight model, written in a real format, loaded and rendered."""
    from .models.model_manager import ModelManager
    from .pipelines.sd_image import SDImagePipeline
    from .testing.factory import write_sd_checkpoint
    from .utils.atomic import atomic_save_image

    print("diffsynth demo: SELF-CHECK OF THE INSTALL, NOT ART.")
    print("It builds a tiny random-weight Stable Diffusion model (no download), saves it as a real")
    print(".safetensors checkpoint, loads it back and renders. Expect coloured noise.")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sd_checkpoint(os.path.join(tmp, "tiny_sd15.safetensors"), seed=args.seed)
        mm = ModelManager(torch_dtype=torch.float32, device=args.device)
        mm.load_models([path])
        pipe = SDImagePipeline.from_model_manager(mm)
        torch.manual_seed(args.seed)
        image = pipe("a photo of a cat", negative_prompt="blurry", height=args.size, width=args.size, num_inference_steps=args.steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save_image(image, args.out)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}). The install works.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth", description="DiffSynth Studio, disk-cache edition")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what a model file is: family, dtype, parameter count")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("txt2img", help="render one image from a prompt")
    p.add_argument("--model", action="append", required=True, help="checkpoint, VAE or LoRA file / diffusers folder; repeat for several")
    p.add_argument("--lora-alpha", type=float, action="append", default=[], help="strength of each LoRA file, in order")
    p.add_argument("--textual-inversion-folder", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, help="output PNG path (written atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--device", default=None, help="cuda, cpu, mps, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 otherwise)")
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("demo", help="self-check: render with a tiny random model (no downloads)")
    p.add_argument("--out", default="demo_output/demo.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # includes ModelFileError: messages are written for users
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
