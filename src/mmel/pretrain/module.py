"""LightningModule that trains an open_clip CLIP from scratch with the multi-positive contrastive loss."""

from __future__ import annotations

import math

import open_clip
import pytorch_lightning as pl
import torch

from mmel.backbone import quiet_open_clip, register_model_configs
from mmel.pretrain.loss import caption_matches, category_spread_loss, multi_positive_contrastive_loss
from mmel.pretrain.quality import category_prompts, top1_present, zero_shot_scores


class TinyClipPretrainer(pl.LightningModule):
    """Contrastive pretraining of ``arch`` (an open_clip config name) on (image, caption, object sets) batches.

    Batches: images [B, 3, S, S], tokens [B, L], image objects [B, C], caption objects [B, C] (multi-hot);
    each step contrasts the B images with the B captions and the C one-object category captions.
    Validation: zero-shot top-1 over the category prompts ("val/top1_present").
    ``text_spread`` weighs :func:`mmel.pretrain.loss.category_spread_loss` (keeps shape words from collapsing).
    """

    def __init__(
        self,
        arch: str = "mmel-tiny",
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        max_steps: int = 600,
        text_spread: float = 1.0,
        pair_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        register_model_configs()
        # trained from scratch here, or filled from a Lightning checkpoint right after: open_clip's "No pretrained
        # weights loaded ... initialized randomly" warning would be noise (verbose=true / MMEL_VERBOSE=1 shows it)
        with quiet_open_clip(weights_loaded=True):
            self.model = open_clip.create_model(arch, pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(arch)
        self.register_buffer("prompt_tokens", self.tokenizer(category_prompts()), persistent=False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):  # a relational batch: its exact match matrix (mmel.pretrain.relational)
            images, tokens, image_objects = batch["images"], batch["tokens"], batch["image_objects"]
            eye = torch.eye(len(self.prompt_tokens), device=self.device)
            matches = torch.cat([batch["matches"], caption_matches(image_objects, eye)], dim=1)
        else:
            images, tokens, image_objects, caption_objects = batch
            caption_objects = torch.cat([caption_objects, torch.eye(len(self.prompt_tokens), device=self.device)])
            matches = caption_matches(image_objects, caption_objects)
        # the batch's captions plus the C one-object captions (see mmel.pretrain.loss)
        tokens = torch.cat([tokens, self.prompt_tokens])
        image_features = self.model.encode_image(images, normalize=True).float()
        text_features = self.model.encode_text(tokens, normalize=True).float()
        scale = self.model.logit_scale.exp().float()
        loss = multi_positive_contrastive_loss(image_features, text_features, scale, matches)
        self.log("train/contrastive", loss)
        if self.hparams.text_spread > 0:
            spread = category_spread_loss(text_features[-len(self.prompt_tokens) :])
            self.log("train/text_spread", spread)
            loss = loss + self.hparams.text_spread * spread
        if self.hparams.pair_weight > 0 and isinstance(batch, dict) and bool(batch["pairs"].any()):
            loss = loss + self.hparams.pair_weight * self._pair_loss(
                image_features, text_features, scale, batch["pairs"]
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def _pair_loss(self, image_features, text_features, scale, pairs) -> torch.Tensor:
        """Each pair item's image against its own expression and that expression's relation swap (false of the
        image): a two-way cross-entropy. In the batch-wide loss the one swapped caption is one negative among
        hundreds; here it is the only one, so the gradient is about the relation word and nothing else."""
        b = len(pairs)
        idx = pairs.nonzero().flatten()
        true = (image_features[idx] * text_features[idx]).sum(-1)
        swapped = (image_features[idx] * text_features[b + idx]).sum(-1)
        logits = scale * torch.stack([true, swapped], dim=1)
        pair = torch.nn.functional.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long, device=logits.device))
        self.log("train/pair", pair)
        return pair

    def validation_step(self, batch, batch_idx: int) -> None:
        if isinstance(batch, dict):
            images, image_objects = batch["images"], batch["image_objects"]
        else:
            images, _, image_objects, _ = batch
        scores = zero_shot_scores(self.model, self.prompt_tokens, images)
        self.log("val/top1_present", top1_present(scores, image_objects), batch_size=len(images))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # CLIP's clamp: a temperature above 100 makes the loss spiky
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # gains, biases, scales and the learnt embeddings are not weight-decayed (as in CLIP / open_clip)
            skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name
            (no_decay if skip else decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            t = (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
