"""LightningModule for contrastive image-text training with the CLIP in models/clip.py.

Validation embeds the whole validation set, gathers it from every rank and reports retrieval
recall image->text and text->image at 1/5/10 over unique images and unique captions, and, when the
data has classes (shapes, image folders), zero-shot classification accuracy.
"""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import MeanMetric

from ..errors import ConfigError
from ..losses.contrastive import build_contrastive_loss
from ..models.clip import CLIP, CLIPOutput
from ..networks import build
from .optim import configure_optimizers


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N,) -> (index of the first item of each unique id (U,), unique position of each item (N,))."""
    _, inverse = torch.unique(ids, return_inverse=True)
    n = ids.shape[0]
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=ids.device), reduce="amin")
    return first, inverse


def _hits(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_of_pair: torch.Tensor,
    gallery_of_pair: torch.Tensor,
    ks: Sequence[int],
    chunk: int,
) -> torch.Tensor:
    """(len(ks),) number of queries with a positive in their top k. Pair p makes gallery item
    gallery_of_pair[p] a positive of query query_of_pair[p]. A query's rank is the number of
    negatives scoring above its best positive, so duplicates of a positive never push it down."""
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    k = torch.tensor(list(ks), device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ gallery.T  # (q, G)
        positive = torch.zeros_like(sim, dtype=torch.bool)
        inside = (query_of_pair >= start) & (query_of_pair < start + chunk)
        positive[query_of_pair[inside] - start, gallery_of_pair[inside]] = True
        best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (q, 1)
        rank = ((sim > best) & ~positive).sum(dim=1)  # (q,) 0 = a positive is first
        hits += (rank[:, None] < k[None, :]).sum(dim=0)
    return hits


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways over N (image, caption) pairs: (N, E) unit features, (N,) ids.

    Queries and galleries are the unique images and unique captions (equal ids are one item: COCO's
    5 captions share an image, identical captions share a text id), so duplicated rows, e.g. those a
    DistributedSampler pads with, neither count twice nor crowd a positive out of the top k."""
    image_first, image_of_pair = _first_of_each(image_ids)
    text_first, text_of_pair = _first_of_each(text_ids)
    images, texts = image_features[image_first].float(), text_features[text_first].float()  # (I, E), (T, E)
    i2t = _hits(images, texts, image_of_pair, text_of_pair, ks, chunk) / images.shape[0]
    t2i = _hits(texts, images, text_of_pair, image_of_pair, ks, chunk) / texts.shape[0]
    metrics = {f"i2t_R@{k}": float(v) for k, v in zip(ks, i2t)}
    metrics.update({f"t2i_R@{k}": float(v) for k, v in zip(ks, t2i)})
    return metrics


class CLIPModule(L.LightningModule):
    """Hyperparameters are plain dicts, so checkpoints load with torch.load(weights_only=True).

    net: the network's `_target_` node (configs/model/clip_net/*.yaml). loss: "infonce" or "sigmoid".
    optimizer, scheduler: `_partial_` nodes (configs/model/optimizer/, configs/model/scheduler/).
    compile: torch.compile the network.
    """

    work_unit = "samples"  # what the throughput callback counts

    def __init__(
        self,
        net: dict[str, Any],
        loss: str,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        compile: bool,
        recall_at: Sequence[int],
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.device("meta"):  # checked once, before anything is built for real
            self.config = self._build(meta=True).config
        if loss == "sigmoid" and self.config.logit_bias_init is None:
            raise ConfigError("model.loss=sigmoid needs a learnable bias: set model.net.logit_bias_init=-10")
        self.loss_fn = build_contrastive_loss(loss)
        self.recall_at = tuple(recall_at)
        self.net: CLIP | None = None
        self.val_loss = MeanMetric()
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._flops: dict[tuple[int, ...], float] = {}

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can create the weights already partitioned.
        if self.net is not None:
            return
        self.net = self._build()
        if self.hparams.compile:
            self.net.compile()

    def _build(self, meta: bool = False) -> CLIP:
        """The network of `net`; `meta=True` (under a meta device) skips the image-tower weights file."""
        node = {**self.hparams.net, "image_checkpoint": None} if meta else self.hparams.net
        return build(node, "model.net")

    def setup(self, stage: str) -> None:
        # The text tower pools at config.eot_id: it must be the tokenizer's end-of-text id.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        eot, n_vocab = datamodule.eot_id, tokenizer.get_vocab_size()
        if eot != self.config.eot_id:
            raise ConfigError(
                f"model.net.eot_id={self.config.eot_id} but the tokenizer's end-of-text id is {eot}; "
                f"set model.net.eot_id={eot}"
            )
        if n_vocab > self.config.vocab_size:
            raise ConfigError(
                f"model.net.vocab_size={self.config.vocab_size} is below the tokenizer's {n_vocab} tokens"
            )

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        return self.net(images, tokens)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.net(batch["image"], batch["text"])  # (B, E) features of B matching pairs
        losses = self.loss_fn(*out)
        self.log("train/loss", losses["loss"])
        for name in ("image_to_text", "text_to_image"):
            if name in losses:
                self.log(f"train/loss_{name}", losses[name])
        self.log("train/logit_scale", out.logit_scale)  # 1 / temperature, at most exp(logit_scale_max)
        if out.logit_bias is not None:
            self.log("train/logit_bias", out.logit_bias)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.net(batch["image"], batch["text"])
        # Gathered over ranks like the training loss: the loss of this step's global batch.
        self.val_loss.update(self.loss_fn(*out)["loss"], weight=batch["text"].shape[0])
        self._val_outputs.append(
            {
                "image": out.image_features.float(),
                "text": out.text_features.float(),
                "image_id": batch["image_id"],
                "text_id": batch["text_id"],
                "label": batch["label"],
            }
        )

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        if not self._val_outputs:
            return
        local = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs.clear()
        # Every rank holds the same number of items (DistributedSampler pads), so all_gather works;
        # (W, N, ...) -> (W*N, ...). Each rank then computes the same metrics.
        gathered = {k: self._gather(v) for k, v in local.items()}
        metrics = retrieval_recall(
            gathered["image"], gathered["text"], gathered["image_id"], gathered["text_id"], self.recall_at
        )
        accuracy = self._zero_shot_accuracy(gathered)
        if accuracy is not None:
            metrics["zero_shot_acc"] = accuracy
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in ("i2t_R@1", "t2i_R@1"))

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    @torch.no_grad()
    def _zero_shot_accuracy(self, gathered: dict[str, torch.Tensor]) -> float | None:
        """Classify each unique labelled image by the nearest class embedding (the normalised mean
        of its prompts' embeddings), as CLIP's zero-shot evaluation does."""
        datamodule = self.trainer.datamodule
        zero_shot = datamodule.zero_shot_tokens() if hasattr(datamodule, "zero_shot_tokens") else None
        if zero_shot is None:
            return None
        first, _ = _first_of_each(gathered["image_id"])
        labels, images = gathered["label"][first], gathered["image"][first]
        labelled = labels >= 0
        if not bool(labelled.any()):
            return None
        _, tokens = zero_shot  # (C, P, T)
        C, P, T = tokens.shape
        flat = tokens.view(C * P, T).to(self.device)
        # Through forward (FSDP-safe), in chunks so a large prompt set fits in memory.
        text = torch.cat([self.net(tokens=chunk).text_features.float() for chunk in flat.split(1024)])  # (C*P, E)
        classes = torch.nn.functional.normalize(text.view(C, P, -1).mean(dim=1), dim=-1)  # (C, E)
        predicted = (images[labelled] @ classes.T).argmax(dim=1)
        return float((predicted == labels[labelled]).float().mean())

    def configure_optimizers(self) -> dict[str, Any]:
        # trainer.model is what the strategy wrapped (DDP, FSDP): its parameters are the ones that train.
        return configure_optimizers(
            self, self.trainer.model.parameters(), self.hparams.optimizer, self.hparams.scheduler
        )

    def count_work(self, batch: dict[str, Any]) -> tuple[int, float]:
        """(pairs in the batch, training FLOPs): 3x the forward FLOPs (backward costs two forwards),
        counted once per input shape by running the network on meta tensors (no memory, no time)."""
        images, tokens = batch["image"], batch["text"]
        key = (*images.shape[1:], tokens.shape[1])
        if key not in self._flops:
            with torch.device("meta"):
                # eval(): BatchNorm refuses a training-mode batch of one; the FLOPs are the same.
                net = self._build(meta=True).eval()
                counter = FlopCounterMode(display=False)
                with counter:
                    net(torch.empty(1, *images.shape[1:]), torch.zeros(1, tokens.shape[1], dtype=torch.long))
            self._flops[key] = 3.0 * counter.get_total_flops()
        return images.shape[0], self._flops[key] * images.shape[0]
