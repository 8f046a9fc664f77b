"""FedDMMR: SASRec + visual and semantic memory experts + item-centric router + residual fusion.

For a candidate item i at a sequence position with backbone state h (DESIGN §2):

    vis_i = VisualExpert(query = P_vis(image_i),  slots = P_vis(image of each memory slot))
    sem_i = SemanticExpert(query = e_i,           slots = P_txt(text of each memory slot))
    w_i   = softmax(Router(e_i)) over the experts whose inputs exist (others get 0)
    s_i   = (h + w_vis,i · LN_vis(vis_i) + w_sem,i · LN_sem(sem_i)) · e_i

The LayerNorms' gain and bias start at zero, so a model whose experts were just switched on
scores exactly like its SASRec backbone; the first gradient step opens the branches.

Experts use cosine attention (bounded logits) and apply their MLP to each slot's value
*before* attending, so an expert's output is a convex combination of per-slot vectors. That
makes "only slots written before position t are visible" a prefix of the position-sorted
slots, and the score terms for every prefix come from cumulative sums of per-slot scalars
(``MemoryExpert.prefix_scores``): training scores 1 + n candidates at every position without
a [B, L, n, S, D] tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .experts import MemoryExpert, Slots, info_nce
from .sasrec import SASRec, SASRecConfig

VARIANTS = ("sasrec", "no-contrast", "no-proto", "full")
STAGES = ("pretrain", "align", "finetune")
GROUPS = ("item_embedding", "backbone", "projections", "experts", "router", "norms")
STAGE_GROUPS = {
    "pretrain": ("item_embedding", "backbone"),
    "align": ("projections",),
    "finetune": ("backbone", "projections", "experts", "router", "norms"),
}
EXPERT_NAMES = ("visual", "semantic")


@dataclass
class FedDMMRConfig(SASRecConfig):
    """The backbone's fields plus the experts'."""

    variant: str = "full"
    visual_dim: int = 512
    text_dim: int = 384
    expert_heads: int = 2
    attention_scale: float = 10.0  # cosine-attention temperature: logits in [-scale, scale]

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.hidden % self.expert_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by expert_heads ({self.expert_heads})")
        super().__post_init__()

    def backbone(self) -> SASRecConfig:
        names = {f.name for f in fields(SASRecConfig)}
        return SASRecConfig(**{k: v for k, v in asdict(self).items() if k in names})

    @property
    def uses_experts(self) -> bool:
        return self.variant != "sasrec"

    @property
    def uses_prototypes(self) -> bool:
        return self.variant in ("full", "no-contrast")

    @property
    def uses_contrast(self) -> bool:
        return self.variant in ("full", "no-proto")

    @property
    def prototype_dim(self) -> int:
        return self.hidden + self.text_dim + self.visual_dim


class FedDMMR(nn.Module):
    def __init__(self, config: FedDMMRConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.backbone = SASRec(config.backbone())
        self.proj_vis = nn.Linear(config.visual_dim, d)
        self.proj_txt = nn.Linear(config.text_dim, d)
        self.vis_expert = MemoryExpert(d, config.expert_heads, config.attention_scale)
        self.sem_expert = MemoryExpert(d, config.expert_heads, config.attention_scale)
        self.router = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(EXPERT_NAMES)))
        self.norm_vis = nn.LayerNorm(d)
        self.norm_sem = nn.LayerNorm(d)
        for norm in (self.norm_vis, self.norm_sem):  # zero gain + bias: experts start switched off
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)
        n = config.num_items + 1
        # Item features are dataset constants: buffers that are never saved or sent.
        self.register_buffer("vis_feat", torch.zeros(n, config.visual_dim), persistent=False)
        self.register_buffer("vis_avail", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.register_buffer("txt_feat", torch.zeros(n, config.text_dim), persistent=False)
        self.register_buffer("txt_avail", torch.zeros(n, dtype=torch.bool), persistent=False)

    # ---------------------------------------------------------------- groups
    def group_modules(self) -> dict[str, list[nn.Module]]:
        b = self.backbone
        return {
            "item_embedding": [b.item_emb],
            "backbone": [b.pos_emb, b.blocks, b.final_norm],
            "projections": [self.proj_vis, self.proj_txt],
            "experts": [self.vis_expert, self.sem_expert],
            "router": [self.router],
            "norms": [self.norm_vis, self.norm_sem],
        }

    def parameter_groups(self) -> dict[str, list[str]]:
        """Group → parameter names, derived from module objects (never from name substrings)."""
        module_name = {id(module): name for name, module in self.named_modules()}
        groups: dict[str, list[str]] = {}
        for group, modules in self.group_modules().items():
            groups[group] = [
                f"{module_name[id(module)]}.{pname}" for module in modules for pname, _ in module.named_parameters()
            ]
        return groups

    def stage_groups(self, stage: str) -> tuple[str, ...]:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
        if not self.config.uses_experts:
            return STAGE_GROUPS["pretrain"]  # a plain SASRec trains its backbone in every stage
        return STAGE_GROUPS[stage]

    # ------------------------------------------------------------- features
    def set_features(self, visual=None, visual_mask=None, text=None, text_mask=None) -> None:
        """Install item feature tables ([num_items + 1, dim] + availability masks); None = modality off."""
        for table, mask, feat, avail in (
            (visual, visual_mask, "vis_feat", "vis_avail"),
            (text, text_mask, "txt_feat", "txt_avail"),
        ):
            target = getattr(self, feat)
            if table is None:
                target.zero_()
                getattr(self, avail).zero_()
                continue
            table = torch.as_tensor(table, dtype=torch.float32)
            if tuple(table.shape) != tuple(target.shape):
                raise ValueError(f"{feat} must have shape {tuple(target.shape)}, got {tuple(table.shape)}")
            mask = torch.as_tensor(mask, dtype=torch.bool)
            target.copy_(table)
            getattr(self, avail).copy_(mask)
            getattr(self, avail)[0] = False

    # ------------------------------------------------------------- backbone
    @property
    def item_emb(self) -> nn.Embedding:
        return self.backbone.item_emb

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(seq)

    # ---------------------------------------------------------------- slots
    def slots(self, items: torch.Tensor, positions: torch.Tensor, prototypes: torch.Tensor | None) -> Slots:
        """Project the features of memory items [B, M] (+ global prototypes [P, proto_dim]) into slots."""
        vis_raw, txt_raw = self.vis_feat[items], self.txt_feat[items]
        vis_ok, txt_ok = self.vis_avail[items], self.txt_avail[items]
        if prototypes is not None and len(prototypes) and self.config.uses_prototypes:
            d, t = self.config.hidden, self.config.text_dim
            batch = items.shape[0]
            proto = prototypes.to(vis_raw.dtype)
            p_txt, p_vis = proto[:, d : d + t], proto[:, d + t :]
            vis_raw = torch.cat([p_vis.expand(batch, -1, -1), vis_raw], 1)
            txt_raw = torch.cat([p_txt.expand(batch, -1, -1), txt_raw], 1)
            vis_ok = torch.cat([(p_vis.abs().sum(-1) > 0).expand(batch, -1), vis_ok], 1)
            txt_ok = torch.cat([(p_txt.abs().sum(-1) > 0).expand(batch, -1), txt_ok], 1)
            positions = torch.cat(
                [torch.full((batch, len(proto)), -1, dtype=positions.dtype, device=positions.device), positions], 1
            )
        return Slots(self.proj_vis(vis_raw), self.proj_txt(txt_raw), vis_ok, txt_ok, positions)

    # ------------------------------------------------------------ experts
    def _fuse(
        self,
        cand: torch.Tensor,
        vis_dot: torch.Tensor,
        sem_dot: torch.Tensor,
        vis_has: torch.Tensor,
        sem_has: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert term of the score and router weights, from each expert's ``LN(out) · e`` [B, Q(, K)].

        An expert without input (no visible slot with that modality, or a candidate without an
        image for the visual expert) gets weight 0; the other renormalises.
        """
        logits = self.router(self.item_emb(cand))  # [B, Q, 2]
        if vis_dot.dim() == 3:  # one more axis: the visible-prefix length
            logits, cand = logits.unsqueeze(2), cand.unsqueeze(2)
        available = torch.stack([vis_has & self.vis_avail[cand], sem_has.expand_as(vis_has)], -1)
        logits = logits.masked_fill(~available, -math.inf)
        weights = torch.softmax(logits, -1).nan_to_num(0.0)  # no expert available: both weights 0
        return weights[..., 0] * vis_dot + weights[..., 1] * sem_dot, weights

    def expert_terms(self, cand: torch.Tensor, slots: Slots, visible_count: torch.Tensor | None = None):
        """Expert terms [B, Q] for candidates [B, Q], seeing the first ``visible_count`` [B, Q] slots
        (None: all). Also returns the pre-norm expert outputs and router weights (for the losses)."""
        num_slots = slots.vis.shape[1]
        order = torch.arange(num_slots, device=cand.device)
        if visible_count is None:
            visible = torch.ones(*cand.shape, num_slots, dtype=torch.bool, device=cand.device)
        else:
            visible = order < visible_count[..., None]
        vis_vis = visible & slots.vis_ok[:, None, :]
        sem_vis = visible & slots.txt_ok[:, None, :]
        emb = self.item_emb(cand)
        vis = self.vis_expert(self.proj_vis(self.vis_feat[cand]), slots.vis, vis_vis)
        sem = self.sem_expert(emb, slots.txt, sem_vis)
        vis_dot = (self.norm_vis(vis) * emb).sum(-1)
        sem_dot = (self.norm_sem(sem) * emb).sum(-1)
        term, weights = self._fuse(cand, vis_dot, sem_dot, vis_vis.any(-1), sem_vis.any(-1))
        return term, vis, sem, weights

    def explain(self, cand: torch.Tensor, slots: Slots) -> dict[str, torch.Tensor]:
        """Why candidates [B, Q] score as they do with every slot visible: router weights [B, Q, 2]
        (visual, semantic), each expert's attention over the slots [B, Q, S], the experts' score term [B, Q]."""
        emb = self.item_emb(cand)
        vis_query = self.proj_vis(self.vis_feat[cand])
        vis_vis = slots.vis_ok[:, None, :].expand(*cand.shape, -1)
        sem_vis = slots.txt_ok[:, None, :].expand(*cand.shape, -1)
        term, _, _, weights = self.expert_terms(cand, slots)
        return {
            "router": weights,
            "term": term,
            "visual": self.vis_expert.attention(vis_query, slots.vis, vis_vis),
            "semantic": self.sem_expert.attention(emb, slots.txt, sem_vis),
        }

    def expert_prefix_terms(self, cand: torch.Tensor, slots: Slots) -> torch.Tensor:
        """Expert terms [B, Q, S + 1] for candidates [B, Q] when the first k slots are visible."""
        emb = self.item_emb(cand)
        vis_dot = self.vis_expert.prefix_scores(
            self.proj_vis(self.vis_feat[cand]), slots.vis, slots.vis_ok, self.norm_vis, emb
        )
        sem_dot = self.sem_expert.prefix_scores(emb, slots.txt, slots.txt_ok, self.norm_sem, emb)
        pad = torch.zeros_like(slots.vis_ok[:, :1])
        vis_has = torch.cat([pad, slots.vis_ok], 1).cumsum(1) > 0  # [B, S + 1]
        sem_has = torch.cat([pad, slots.txt_ok], 1).cumsum(1) > 0
        shape = vis_dot.shape
        term, _ = self._fuse(
            cand, vis_dot, sem_dot, vis_has[:, None, :].expand(shape), sem_has[:, None, :].expand(shape)
        )
        return term

    # ------------------------------------------------------------- scoring
    def train_logits(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        target_positions: torch.Tensor,
        negatives: torch.Tensor,
        slots: Slots | None,
        use_experts: bool,
    ) -> dict:
        """Logits of every position's target [B, L] and of the user's shared negatives [B, L, n].

        Position j may only see slots whose source position is < the target's position.
        """
        shared = negatives.dim() == 2  # [B, n] shared by all positions, or [B, L, n]
        pos = (hidden * self.item_emb(targets)).sum(-1)
        if shared:
            neg = hidden @ self.item_emb(negatives).transpose(1, 2)
        else:
            neg = (hidden.unsqueeze(2) * self.item_emb(negatives)).sum(-1)
        out = {"pos": pos, "neg": neg}
        if not (use_experts and self.config.uses_experts and slots is not None):
            return out
        visible_count = torch.searchsorted(slots.positions.contiguous(), target_positions.contiguous(), side="left")
        pos_term, vis, sem, weights = self.expert_terms(targets, slots, visible_count)
        if shared:
            table = self.expert_prefix_terms(negatives, slots)  # [B, n, S + 1]
            n = negatives.shape[1]
            neg_term = table.gather(2, visible_count[:, None, :].expand(-1, n, -1)).transpose(1, 2)
        else:
            batch, length, n = negatives.shape
            counts = visible_count.unsqueeze(-1).expand(-1, -1, n).reshape(batch, length * n)
            neg_term = self.expert_terms(negatives.reshape(batch, length * n), slots, counts)[0].view(batch, length, n)
        out.update(pos=pos + pos_term, neg=neg + neg_term, vis=vis, sem=sem, weights=weights)
        return out

    def score(self, hidden: torch.Tensor, candidates: torch.Tensor | None, slots: Slots | None) -> torch.Tensor:
        """Scores [B, C] of candidates [B, C] (None: every item) from last-position states [B, D]."""
        if candidates is None:
            candidates = torch.arange(self.config.num_items + 1, device=hidden.device).expand(len(hidden), -1)
        base = (hidden[:, None, :] * self.item_emb(candidates)).sum(-1)
        if not self.config.uses_experts or slots is None:
            return base
        term, *_ = self.expert_terms(candidates, slots)
        return base + term

    # -------------------------------------------------------------- losses
    def align_stage_loss(self, items: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
        """Stage 2: map CLIP/SBERT into the (frozen) ID space. InfoNCE between each item's projected
        text / image feature and its ID embedding, and between the two modalities."""
        items = torch.unique(items[items > 0])
        emb = self.item_emb(items).detach()
        txt, vis = self.proj_txt(self.txt_feat[items]), self.proj_vis(self.vis_feat[items])
        has_t, has_v = self.txt_avail[items], self.vis_avail[items]
        losses = [
            info_nce(txt[has_t], emb[has_t], temperature),
            info_nce(vis[has_v], emb[has_v], temperature),
            info_nce(txt[has_t & has_v], vis[has_t & has_v], temperature),
        ]
        present = [loss for loss in losses if loss is not None]
        if not present:
            raise ValueError("align stage: no item in the batch has a text or image feature")
        return torch.stack(present).mean()
