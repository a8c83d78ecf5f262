"""The forward step handed to megatron's ``get_forward_backward_func`` schedules.

A batch is a dict of [b, s] tensors: ``tokens``, ``labels``, ``loss_mask`` and
``position_ids``. The loss is the mean token cross-entropy of the micro-batch; the
schedules divide it by the number of micro-batches and set the MoE aux-loss scale.
Only chunks that embed tokens (first pipeline stage) or compute the loss (last) read
batches; an inner chunk has no data iterator and works on the activations it receives.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = (losses * mask).sum() / mask.sum().clamp_min(1.0)
    # A copy: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"lm loss": loss.detach().clone()}


def gpt_forward_step(data_iterator: Iterator[dict] | None, model: torch.nn.Module):
    if data_iterator is None:  # an inner pipeline chunk: its input is the previous stage's output
        return model(None, None, None), None
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])
