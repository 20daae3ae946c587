"""``python -m mmel.pretrain --out PATH --seed 0``: train the tiny CLIP on the shapes world (see mmel.pretrain.tiny)."""

from mmel.pretrain.tiny import main

if __name__ == "__main__":
    main()
