"""Command line: ``python -m resfuse demo [options]``."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m resfuse demo [--model resnet18|resnet50|vgg16_bn] [--device D] "
              "[--dtype T] [--batch N] [--size S] [--backend B]\n"
              "       python -m resfuse demo --help")
        return 0 if argv else 2
    if argv[0] != "demo":
        print(f"python -m resfuse: unknown command {argv[0]!r} (expected 'demo')", file=sys.stderr)
        return 2
    from .demo import main as demo_main
    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
