"""`python -m snlp_lab.generate --checkpoint RUN --prompt TEXT --max-new-tokens N [--config C] [--speculative B]`:
continue a text prompt with a trained model (the command lives in `snlp_lab.cli`; the decoding function
is `snlp_lab.generate`, from `snlp_lab.decode`)."""
import sys

from snlp_lab.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
