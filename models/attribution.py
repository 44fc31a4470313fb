"""Evidence attribution: rank a finding's concepts by what removing them would do to it.

The fusion's attention says where each image token looked among the concepts. It does not
say what a concept did to a finding's score: attention mass can sit on a concept whose
value changes nothing downstream. The deletion test (:mod:`models.faithfulness`) asks the
second question, and an attention ranking answers it little better than chance (the
shipped model's top-5 evidence moved its findings about as much as 5 random concepts).

Here a finding is attributed to concept ``n`` by the first-order effect of removing it.
Add ``b_n`` to every fusion attention score for ``n``: ``b = 0`` is the model as it is and
``b_n -> -inf`` hides ``n``, which is what the deletion test does. In the softmax this is
weighting ``exp(s_n)`` by ``g_n = exp(b_n)``, so removing ``n`` is ``g_n: 1 -> 0`` and its
linear estimate is

``attribution[k, n] = d logit_k / d g_n = d logit_k / d b_n`` at ``b = 0``,

the logit the finding would lose, to first order, without the concept. One backward pass
through the fusion and decoder per finding gives it for every concept at once (batched with
``is_grads_batched``); the image encoder runs once, without gradients.

:func:`attribution_shares` turns it into relevances in [0, 1]: each concept's share of the
finding's positive attribution (what the path search and the API report).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from models.model import KgdxModel
from models.outputs import KgdxOutput


def attributed_forward(
    model: KgdxModel,
    images: torch.Tensor,
    text_tokens: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    columns: Sequence[int] | None = None,
) -> KgdxOutput:
    """The model's output with the evidence attribution, from one forward pass.

    Args:
        model: the model, in eval mode (dropout off); its entities may be cached.
        images: (B, 1, S, S) preprocessed images on the model's device.
        text_tokens, text_mask: optional clinical text, as in :meth:`KgdxModel.forward`.
        columns: positions in ``model.config.targets`` to score and attribute (default all).

    Returns:
        the :class:`KgdxOutput` of those columns, detached, with ``entity_attribution``
        (B, C, N) ``d logit / d b_n`` and ``entity_relevance`` its
        :func:`attribution_shares`. Autograd runs even when called under
        ``torch.no_grad()`` or ``torch.inference_mode()``. Run it without autocast: in
        half precision small gradients round to zero and the ranking loses its order.
    """
    from models.inference import reuse_image_tokens  # inference imports this module

    k = len(model.config.targets)
    cols = list(range(k)) if columns is None else [int(c) for c in columns]
    bad = [c for c in cols if not 0 <= c < k]
    if bad or not cols:
        raise ValueError(f"columns must be positions in [0, {k}), got {cols}")
    b, n = images.shape[0], model.num_entities
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))  # works inside inference_mode too
        if images.is_inference():
            images = images.clone()
        with torch.no_grad():  # the image encoder takes no part in the gradient
            take = stack.enter_context(reuse_image_tokens(model, images))
        with torch.enable_grad():
            bias = torch.zeros(b, n, device=images.device, requires_grad=True)
            out = model(take(None), text_tokens, text_mask, cols, entity_bias=bias)
            logits = out.logits.float()  # (B, C)
            c = len(cols)
            eye = torch.eye(c, device=logits.device)  # one backward pass per column, batched
            seeds = eye[:, None, :].expand(c, b, c)  # (C, B, C)
            (grad,) = torch.autograd.grad(logits, bias, seeds, is_grads_batched=True)
    attribution = grad.permute(1, 0, 2)  # (C, B, N) -> (B, C, N), float32 as the bias
    detached = {
        f.name: getattr(out, f.name).detach()
        for f in dataclasses.fields(out)
        if isinstance(getattr(out, f.name), torch.Tensor)
    }
    detached["entity_relevance"] = attribution_shares(attribution)
    return dataclasses.replace(out, **detached, entity_attribution=attribution)


def attribution_shares(attribution: torch.Tensor) -> torch.Tensor:
    """Each concept's share of a finding's positive attribution, in [0, 1].

    Concepts whose removal would not lower the logit get 0; a finding with no positive
    attribution gets 0 everywhere.

    Shapes:
        attribution (..., N) -> (..., N), each row summing to 1 or 0.
    """
    positive = attribution.clamp_min(0.0)
    total = positive.sum(-1, keepdim=True)
    return torch.where(total > 0, positive / total.clamp_min(1e-30), torch.zeros_like(positive))
