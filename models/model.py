"""The knowledge-fused network: image (+ text) tokens, ontology entities, finding queries.

``images -> ImageEncoder -> [V; T] -> KnowledgeFusion(E) -> FindingDecoder(E[findings])``,
with ``E = OntologyGNN(text features of the concepts)`` computed once per forward pass (or
once in all, after :meth:`KgdxModel.cache_entities`), never per sample.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kg.tensors import GraphArrays
from models.config import KgdxModelConfig
from models.decoder import DecoderOutput, FindingDecoder
from models.errors import ConfigError, ModelError, UnknownConceptError
from models.fusion import KnowledgeFusion
from models.gnn import OntologyGNN, check_edge_types, k_hop_subgraph_for
from models.image_encoder import ImageEncoder
from models.outputs import KgdxOutput


class KgdxModel(nn.Module):
    """Knowledge-graph-augmented multi-label classifier with explanations.

    The graph (node features, ``edge_index``, ``edge_type``) lives in non-persistent buffers:
    it moves with ``.to(device)`` but is not part of the saved weights, since it comes from
    the ontology store at load time (see :mod:`models.checkpoint`).

    Args:
        config: :class:`~models.config.KgdxModelConfig`; ``config.gnn.num_relations = 0`` is
            resolved from the graph (the model's ``config`` holds the resolved copy).
        arrays: the ontology graph; required when ``config.use_kg``; with ``use_kg=False`` it
            is optional and only checks that the targets exist.
        node_features: (N, gnn.in_dim) text features of ``arrays``' nodes (see
            :func:`models.text_encoder.concept_features`); required when ``config.use_kg``.

    Shapes:
        images: (B, 1, H, W); text_tokens: (B, L, text_dim); text_mask: (B, L) bool,
        ``True`` = real token. See :class:`~models.outputs.KgdxOutput` for the outputs.
    """

    node_features: torch.Tensor
    edge_index: torch.Tensor
    edge_type: torch.Tensor
    target_nodes: torch.Tensor
    node_target: torch.Tensor
    _entity_cache: torch.Tensor | None

    def __init__(
        self,
        config: KgdxModelConfig,
        arrays: GraphArrays | None = None,
        node_features: torch.Tensor | None = None,
    ):
        super().__init__()
        config = copy.deepcopy(config)
        self.config = config
        d = config.dim
        k = len(config.targets)
        self.gnn: OntologyGNN | None = None
        self.label_embeddings: nn.Parameter | None = None
        if config.use_kg:
            arrays, node_features = self._graph(config, arrays, node_features)
            self.entity_ids: list[str] = list(arrays.node_ids)
            self.relations: list[str] | None = list(arrays.relations)
            self.gnn = OntologyGNN(config.gnn)
            self.entity_proj: nn.Module = (
                nn.Identity() if config.gnn.hidden == d else nn.Linear(config.gnn.hidden, d)
            )
            index = arrays.index()
            self.register_buffer("node_features", node_features.float(), persistent=False)
            self.register_buffer(
                "edge_index",
                torch.as_tensor(arrays.edge_index, dtype=torch.long),
                persistent=False,
            )
            self.register_buffer(
                "edge_type",
                torch.as_tensor(arrays.edge_type, dtype=torch.long),
                persistent=False,
            )
            check_edge_types(self.edge_type, config.gnn.num_relations)  # once, not per step
            target_nodes = torch.tensor([index[t] for t in config.targets], dtype=torch.long)
        else:
            if arrays is not None:
                _check_targets(config.targets, arrays)
            self.entity_ids = list(config.targets)
            self.relations = None
            self.label_embeddings = nn.Parameter(torch.empty(k, d))
            self.entity_proj = nn.Identity()
            target_nodes = torch.arange(k)
        self.register_buffer("target_nodes", target_nodes, persistent=False)  # (K,)
        node_target = torch.full((len(self.entity_ids),), -1, dtype=torch.long)
        node_target[target_nodes] = torch.arange(k)
        self.register_buffer("node_target", node_target, persistent=False)  # (N,)
        self._index = {cid: i for i, cid in enumerate(self.entity_ids)}

        self.image_encoder = ImageEncoder(config.image)
        self.image_proj: nn.Module = (
            nn.Identity() if config.image.out_dim == d else nn.Linear(config.image.out_dim, d)
        )
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, d), nn.LayerNorm(d))
        self.modality = nn.Parameter(torch.empty(2, d))  # [image, text] type embeddings
        self.fusion = KnowledgeFusion(d, config.fusion)
        self.decoder = FindingDecoder(d, config.decoder)
        self.query_bias: nn.Parameter | None = None
        self.logit_bias: nn.Parameter | None = None
        if config.decoder.target_bias:
            self.query_bias = nn.Parameter(torch.empty(k, d))
            self.logit_bias = nn.Parameter(torch.empty(k))
        self.register_buffer("_entity_cache", None, persistent=False)
        #: ``checkpoint.json`` contents once loaded by :func:`models.checkpoint.load_checkpoint`.
        self.info: dict[str, Any] = {}
        self.reset_parameters()

    @staticmethod
    def _graph(
        config: KgdxModelConfig, arrays: GraphArrays | None, feats: torch.Tensor | None
    ) -> tuple[GraphArrays, torch.Tensor]:
        if arrays is None or feats is None:
            raise ConfigError(
                "use_kg=True needs the graph: pass arrays and node_features "
                "(or set use_kg=False for the --no-kg ablation)"
            )
        if feats.shape != (arrays.num_nodes, config.gnn.in_dim):
            raise ConfigError(
                f"node_features must have shape ({arrays.num_nodes}, gnn.in_dim="
                f"{config.gnn.in_dim}), got {tuple(feats.shape)}"
            )
        _check_targets(config.targets, arrays)
        if config.k_hops is not None:
            hood = k_hop_subgraph_for(config.targets, arrays, config.k_hops)
            arrays, feats = hood.arrays, feats[hood.nodes]
        r = max(arrays.num_relations, 1)
        if config.gnn.num_relations == 0:
            config.gnn.num_relations = r
        elif config.gnn.num_relations < arrays.num_relations:
            raise ConfigError(
                f"gnn.num_relations={config.gnn.num_relations} but the graph has "
                f"{arrays.num_relations} relation types"
            )
        return arrays, feats

    def reset_parameters(self) -> None:
        nn.init.normal_(self.modality, std=0.02)
        if self.label_embeddings is not None:
            nn.init.normal_(self.label_embeddings, std=0.02)
        if self.query_bias is not None and self.logit_bias is not None:
            nn.init.zeros_(self.query_bias)
            nn.init.zeros_(self.logit_bias)

    # -- entities ---------------------------------------------------------------------------

    @property
    def num_entities(self) -> int:
        return len(self.entity_ids)

    def concept_indices(self, concept_ids: Sequence[str]) -> list[int]:
        """Entity indices of ``concept_ids`` (for :meth:`score_concepts`)."""
        missing = [c for c in concept_ids if c not in self._index]
        if missing:
            raise UnknownConceptError(missing, "model's graph")
        return [self._index[c] for c in concept_ids]

    def entity_embeddings(self) -> torch.Tensor:
        """Entity embeddings ``E``: the cached ones if :meth:`cache_entities` ran, else fresh.

        Shapes:
            returns (N, D).
        """
        if self._entity_cache is not None:
            return self._entity_cache
        if self.gnn is None:
            assert self.label_embeddings is not None
            return self.label_embeddings  # (K, D): the ablation's entities are the labels
        h = self.gnn(
            self.node_features, self.edge_index, self.edge_type, types_checked=True
        )  # (N, hidden)
        return self.entity_proj(h)  # (N, D)

    def cache_entities(self) -> torch.Tensor:
        """Compute ``E`` once and reuse it in every later forward (serving).

        Cleared by :meth:`clear_entity_cache` and by ``train()``, since training changes
        the GNN. Call after ``eval()`` and after loading weights. The cache is an ordinary
        tensor even when called under ``torch.inference_mode()``, so forwards that need
        autograd (the evidence attribution, :mod:`models.attribution`) can use it.
        """
        self._entity_cache = None
        with torch.inference_mode(False), torch.no_grad():
            self._entity_cache = self.entity_embeddings().detach()
        return self._entity_cache

    freeze_entities = cache_entities

    def clear_entity_cache(self) -> None:
        self._entity_cache = None

    def train(self, mode: bool = True) -> KgdxModel:
        if mode:
            self._entity_cache = None
        return super().train(mode)

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        targets: list[int] | None = None,
        entity_mask: torch.Tensor | None = None,
        entity_bias: torch.Tensor | None = None,
    ) -> KgdxOutput:
        """Score the trained targets.

        Args:
            images: (B, 1, H, W) preprocessed images.
            text_tokens: optional (B, L, text_dim) clinical text token embeddings
                (:meth:`~models.text_encoder.TextEncoder.token_embeddings`).
            text_mask: optional (B, L) bool, ``True`` at real tokens, ``False`` at padding.
            targets: positions in ``config.targets`` to score (default: all, in order).
            entity_mask: optional (N,) or (B, N) bool, ``True`` hides an entity from the
                fusion (used to measure the faithfulness of evidence).
            entity_bias: optional (N,) or (B, N) float added to the fusion's attention
                scores for each entity; its gradient is the evidence attribution
                (:mod:`models.attribution`).
        """
        k = len(self.config.targets)
        if targets is None:
            pos = torch.arange(k, device=self.target_nodes.device)
        else:
            bad = [t for t in targets if not 0 <= t < k]
            if bad:
                raise ValueError(f"targets holds positions outside [0, {k}): {bad}")
            pos = torch.tensor(targets, dtype=torch.long, device=self.target_nodes.device)
        return self._predict(
            images, self.target_nodes[pos], pos, text_tokens, text_mask, entity_mask, entity_bias
        )

    def score_concepts(
        self,
        images: torch.Tensor,
        concept_indices: Sequence[int] | torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        entity_mask: torch.Tensor | None = None,
    ) -> KgdxOutput:
        """Score any concepts of the graph, trained targets or not (zero-shot).

        Args:
            images: (B, 1, H, W).
            concept_indices: entity indices (see :meth:`concept_indices`), K of them.
            text_tokens, text_mask, entity_mask: as in :meth:`forward`.
        """
        if self.gnn is None:
            raise ModelError(
                "zero-shot scoring needs the knowledge graph; this model is the --no-kg "
                "ablation and knows only its targets"
            )
        nodes = torch.as_tensor(concept_indices, dtype=torch.long, device=self.node_target.device)
        if nodes.dim() != 1 or nodes.numel() == 0:
            raise ValueError("concept_indices must be a non-empty 1-D sequence")
        n = self.num_entities
        if int(nodes.min()) < 0 or int(nodes.max()) >= n:
            raise ValueError(f"concept_indices must lie in [0, {n})")
        return self._predict(
            images, nodes, self.node_target[nodes], text_tokens, text_mask, entity_mask
        )

    def _predict(
        self,
        images: torch.Tensor,
        nodes: torch.Tensor,
        target_pos: torch.Tensor,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        entity_mask: torch.Tensor | None,
        entity_bias: torch.Tensor | None = None,
    ) -> KgdxOutput:
        entities = self.entity_embeddings()  # (N, D), once for the whole batch
        queries = entities[nodes]  # (K, D)
        logit_bias = None
        if self.query_bias is not None and self.logit_bias is not None:
            known = (target_pos >= 0).unsqueeze(-1)  # (K, 1): zero-shot concepts get no bias
            idx = target_pos.clamp_min(0)
            queries = queries + self.query_bias[idx] * known  # (K, D)
            logit_bias = self.logit_bias[idx] * known.squeeze(-1)  # (K,)

        def fuse_and_decode(patch_tokens: torch.Tensor) -> tuple[DecoderOutput, torch.Tensor]:
            return self._fuse_and_decode(
                patch_tokens, queries, entities, text_tokens, text_mask, logit_bias,
                entity_mask, entity_bias,
            )  # fmt: skip

        patches = self.image_encoder(images)
        dec, fusion_attn = fuse_and_decode(patches.tokens)
        patch_attention = dec.patch_attention
        if (
            self.config.decoder.map_gradient == "fusion"
            and self.training
            and torch.is_grad_enabled()
        ):
            # the map again from the detached feature map: a loss on it (the box loss) trains
            # the token projection, fusion, GNN and decoder, never the CNN
            patch_attention = fuse_and_decode(patches.tokens.detach())[0].patch_attention
        assert dec.entity_relevance is not None
        ids = [self.entity_ids[i] for i in nodes.tolist()]
        return KgdxOutput(
            logits=dec.logits,
            probabilities=torch.sigmoid(dec.logits),
            patch_attention=patch_attention,
            grid=patches.grid,
            entity_relevance=dec.entity_relevance,
            concept_ids=ids,
            entity_ids=self.entity_ids,
            fusion_attention=fusion_attn,
            token_attention=dec.token_attention,
        )

    def _fuse_and_decode(
        self,
        patch_tokens: torch.Tensor,
        queries: torch.Tensor,
        entities: torch.Tensor,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        logit_bias: torch.Tensor | None,
        entity_mask: torch.Tensor | None,
        entity_bias: torch.Tensor | None,
    ) -> tuple[DecoderOutput, torch.Tensor]:
        """Image (+ text) tokens through fusion and decoder: the decoder's output and the
        fusion attention (B, S, N)."""
        v = self.image_proj(patch_tokens) + self.modality[0]  # (B, P, D)
        b, p, _ = v.shape
        tokens = v
        token_mask: torch.Tensor | None = None
        if text_tokens is not None:
            if text_tokens.dim() != 3 or text_tokens.shape[0] != b:
                raise ValueError(
                    f"text_tokens must have shape ({b}, L, {self.config.text_dim}), got "
                    f"{tuple(text_tokens.shape)}"
                )
            t = self.text_proj(text_tokens) + self.modality[1]  # (B, L, D)
            tokens = torch.cat([v, t], 1)  # (B, P + L, D)
            if text_mask is not None:
                if text_mask.shape != text_tokens.shape[:2]:
                    raise ValueError(
                        f"text_mask must have shape {tuple(text_tokens.shape[:2])}, got "
                        f"{tuple(text_mask.shape)}"
                    )
                pad = torch.zeros(b, p, dtype=torch.bool, device=v.device)
                token_mask = torch.cat([pad, ~text_mask.bool()], 1)  # (B, P + L) True = pad
        elif text_mask is not None:
            raise ValueError("text_mask given without text_tokens")

        fused, fusion_attn = self.fusion(tokens, entities, entity_mask, entity_bias)  # (B,S,D)
        if token_mask is not None:
            fusion_attn = fusion_attn.masked_fill(token_mask.unsqueeze(-1), 0.0)
        dec = self.decoder(queries, fused, p, token_mask, logit_bias, fusion_attn)
        return dec, fusion_attn


def _check_targets(targets: Sequence[str], arrays: GraphArrays) -> None:
    index = arrays.index()
    missing = [t for t in targets if t not in index]
    if missing:
        raise UnknownConceptError(missing, "ontology (config.targets)")
