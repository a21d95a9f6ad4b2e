"""At the end of each validation, continue fixed prompts with the model and log the text."""

from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ..generation import complete
from ..networks import CausalLM


class TextSamples(L.Callback):
    """Every rank generates (sharded weights need all ranks in each forward); rank 0 logs.

    Needs `trainer.datamodule.tokenizer` and a module whose `net` follows the causal-LM protocol
    (networks.CausalLM: the GPT and distillation modules, whatever their network). The seed is
    fixed, so successive samples show what training changed, not sampling noise.
    """

    def __init__(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(getattr(pl_module, "net", None), CausalLM):
            return  # only modules whose network is a language model generate text (not CLIP)
        tokenizer = trainer.datamodule.tokenizer
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        texts = []
        was_training = pl_module.net.training
        pl_module.net.eval()
        eager_weights = getattr(trainer.strategy, "eager_weights", lambda net: nullcontext())
        with eager_weights(pl_module.net):  # DeepCompile: the weights are gathered only in the compiled loss
            for prompt in self.prompts:
                completion = complete(
                    pl_module.net,
                    tokenizer,
                    prompt,
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    generator=generator,
                    use_cache=False,  # sharded strategies gather the embeddings and head only inside forward()
                )
                texts.append(f"**{prompt}**{completion}")
        pl_module.net.train(was_training)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # Markdown: two trailing spaces keep the line breaks of the generated text.
                    body = "\n\n---\n\n".join(t.replace("\n", "  \n") for t in texts)
                    logger.experiment.add_text("samples", body, global_step=trainer.global_step)
