"""`cogtune <command>`: subcommands -> stage entry points.

Mistakes a user can fix (CogtuneError) are printed as one line without a traceback, exit status 2.
A run stopped by SIGTERM or SIGUSR1 after saving its work exits with status 75 (run it again to
continue); `cogtune cache verify` exits with status 1 when the cache is damaged.
"""

from __future__ import annotations

import argparse
import sys

from cogtune.errors import EXIT_PREEMPTED, CogtuneError, Preempted
from cogtune.util import logs
from cogtune.util.signals import catch_stop_signals_early, hold_stop_signals_to_the_end

COMMANDS = {
    "init": "Write a family's config, the accelerate configs and the Slurm scripts into a folder: "
            "`cogtune init --family 5b DIR`.",
    "preprocess": "Decode, resize and encode a video dataset into a cache (VAE latents + T5 embeddings).",
    "train": "Train a LoRA on the transformer from a cache; T5 is never loaded, the VAE only to decode validation videos.",
    "infer": "Generate videos with the base pipeline plus a trained LoRA.",
    "cache": "Inspect, verify or prune a cache: `cogtune cache inspect|verify|prune PATH`.",
    "export": "Write a trained LoRA in another tool's layout: `cogtune export --format comfyui`.",
    "merge": "Write the base pipeline with a LoRA merged in, as a diffusers folder: `cogtune merge --merged_dir DIR`.",
    "make-tiny-model": "Write a tiny random-weight CogVideoX pipeline folder (for demos and tests).",
    "make-demo-data": "Write captioned synthetic demo clips in the prompts.txt + videos.txt format.",
}


def _usage() -> str:
    lines = ["usage: cogtune <command> [--config FILE.toml] [flags]   (cogtune --version: the version)", "",
             "commands:"]
    lines += [f"  {name:<16} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `cogtune <command> --help` for its flags."]
    return "\n".join(lines)


def _preprocess(argv):
    from cogtune import preprocess
    from cogtune.config import load_config

    config = load_config("preprocess", argv)
    if config.preview:
        from cogtune.preprocess.preview import preview

        print(preview(config))
        return
    if config.dry_run:
        from cogtune.preprocess.memory import dry_run

        print(dry_run(config))
        return
    result = preprocess.run(config)
    if result.is_main_process:
        from cogtune.util import logs

        logs.result(result.summary(), cache=str(result.cache_path), samples=result.samples, skipped=result.failed,
                    encoded_videos=result.encoded_videos, encoded_captions=result.encoded_captions,
                    copied_videos=result.copied_videos, copied_captions=result.copied_captions,
                    reused_videos=result.reused_videos, reused_captions=result.reused_captions,
                    hashed=result.hashed, sources=result.sources, seconds=round(result.seconds, 1),
                    stages={name: vars(figures) for name, figures in result.stages.items()})


def _train(argv):
    from cogtune import train
    from cogtune.config import data_settings, load_config

    config = load_config("train", argv)
    preprocess_config = None if config.data_cache else data_settings(config, argv)
    if config.dry_run:
        print(train.dry_run(config, preprocess_config))
        return
    result = train.run(config, preprocess_config)
    if result.is_main_process:
        from cogtune.util import logs

        logs.result(f"lora: {result.lora_path}", lora=str(result.lora_path), steps=result.global_step)


def _infer(argv):
    from cogtune import infer
    from cogtune.config import load_config
    from cogtune.util import logs

    config = load_config("infer", argv)
    if config.dry_run:
        from cogtune.infer_memory import dry_run

        print(dry_run(config))
        return
    for path in infer.run(config):
        logs.result(f"video: {path}", video=str(path))


def _init(argv):
    from cogtune.templates import main

    main(argv, COMMANDS["init"])


def _export(argv):
    from cogtune.export import main

    main(argv)


def _merge(argv):
    from cogtune.merge import main

    main(argv, COMMANDS["merge"])


def _cache(argv):
    from cogtune.cache.tool import main

    return main(argv)


def _make_tiny_model(argv):
    from cogtune.dev.tiny import FAMILIES, SIZES, make_tiny_model

    parser = argparse.ArgumentParser(prog="cogtune make-tiny-model", description=COMMANDS["make-tiny-model"])
    parser.add_argument("output_dir", help="Folder to write the pipeline to.")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="2b",
                        help="Which family's structure to imitate (default: 2b).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default: 0).")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="tiny (tests, demo) or small (benchmarks: the real models' proportions, 48M "
                             "transformer parameters).")
    args = parser.parse_args(argv)
    from cogtune.util import logs

    logs.configure("text")  # no library progress bars in a log file
    print(f"model: {make_tiny_model(args.output_dir, args.family, args.seed, args.size)}")


def _make_demo_data(argv):
    from cogtune.dev.tiny import make_demo_data

    parser = argparse.ArgumentParser(prog="cogtune make-demo-data", description=COMMANDS["make-demo-data"])
    parser.add_argument("output_dir", help="Folder to write prompts.txt, videos.txt and videos/ to.")
    args = parser.parse_args(argv)
    print(f"data: {make_demo_data(args.output_dir)}")


HANDLERS = {"init": _init, "preprocess": _preprocess, "train": _train, "infer": _infer, "cache": _cache, "export": _export, "merge": _merge,
            "make-tiny-model": _make_tiny_model, "make-demo-data": _make_demo_data}


def _event(name: str, command: str, text: str) -> None:
    """With --log_format json, the way a run ended is a JSON line too (after the text on stderr)."""
    from cogtune.util import logs

    logs.event(name, command=command, text=text)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own (not a call from Python): the handler holds from here to the end
        catch_stop_signals_early()
        try:
            status = _main(None)
        except SystemExit as e:  # argparse: --help (0), a bad flag (2)
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        stopped = hold_stop_signals_to_the_end()
        if stopped and status == 0:
            print(f"cogtune: stopped by {stopped} after finishing its work; running the command again finds it "
                  "done.", file=sys.stderr)
            return EXIT_PREEMPTED
        return status
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    logs.quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from cogtune import __version__

        print(f"cogtune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"cogtune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        status = HANDLERS[command](rest)
    except Preempted as e:
        print(f"cogtune {command}: {e}", file=sys.stderr)
        _event("stopped", command, str(e))
        return EXIT_PREEMPTED
    except CogtuneError as e:
        print(f"cogtune {command}: error: {e}", file=sys.stderr)
        _event("error", command, str(e))
        return 2
    except KeyboardInterrupt:
        print(f"cogtune {command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
