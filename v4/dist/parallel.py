"""The parallel layout of a deployment, and what one rank of it holds.

Ranks are numbered data-parallel group by group: rank = dp_rank * tp + tp_rank, so a tensor-
parallel group is `tp` consecutive ranks (one node's fast links, as vLLM lays them out).

What each layout splits (the README's "Multi-device" section says the same):
- attention, tensor parallel: query heads (wq_b rows, attn_sink), wo_a by output group and wo_b
  by its input columns (then an all-reduce). The one shared KV head, its compressor and the
  indexer are replicated (see `INDEXER_CHOICE`);
- MoE with expert parallel (EP = TP x DP ranks): routed experts in contiguous ranges per rank,
  tokens sent to their experts' ranks and back; the shared expert is replicated;
- MoE without expert parallel: every expert's intermediate dim split over the TP group (w1/w3
  rows, w2 columns), the shared expert too, then an all-reduce;
- embedding and LM head: vocab rows split over the TP group; logits gathered on the TP group's
  first rank, which samples;
- data parallel: each DP group is a full replica of attention with its own requests and cache;
  with expert parallel its MoE layers exchange tokens with every other group's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

INDEXER_CHOICE = (
    "the lightning indexer is replicated on every TP rank, not split by heads: its top-k must be the same set "
    "on every rank, and a head split would all-reduce a [tokens x compressed entries] score matrix per CSA layer "
    "(1 MiB per sequence per layer at 1M context) to save a q_lora x 64 x 128 projection"
)


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """Range of part i when n items are cut into `parts` near-equal contiguous pieces (the first
    n % parts pieces one longer)."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (1 if i < extra else 0)


@dataclass(frozen=True)
class ParallelConfig:
    """tp: tensor-parallel size; dp: data-parallel size; ep: expert parallel over all tp*dp ranks."""

    tp: int = 1
    dp: int = 1
    ep: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def ep_size(self) -> int:
        return self.world_size if self.ep else 1

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        base = f"DP{self.dp} x TP{self.tp}" if self.dp > 1 else f"TP{self.tp}"
        return base + (f" + EP{self.ep_size}" if self.ep else "")

    def check(self, cfg, source: str = "the parallel layout") -> None:
        """Refuse a layout the model cannot be split by, with one sentence naming the field."""
        for name, v in (("tensor_parallel_size", self.tp), ("data_parallel_size", self.dp)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {v!r}")
        tp = self.tp
        if cfg.num_attention_heads % tp:
            raise ConfigError(f"{source}: num_attention_heads={cfg.num_attention_heads} is not divisible by "
                              f"tensor_parallel_size={tp}; choose a TP size that divides it")
        if cfg.o_groups % tp:
            raise ConfigError(f"{source}: o_groups={cfg.o_groups} is not divisible by tensor_parallel_size={tp} "
                              f"(wo_a is split by output group); choose a TP size that divides {cfg.o_groups}")
        if cfg.vocab_size < tp:
            raise ConfigError(f"{source}: vocab_size={cfg.vocab_size} is smaller than tensor_parallel_size={tp}")
        if self.ep:
            if cfg.n_routed_experts % self.ep_size:
                raise ConfigError(f"{source}: n_routed_experts={cfg.n_routed_experts} is not divisible by the expert-"
                                  f"parallel size {self.ep_size} (= TP {tp} x DP {self.dp}); choose sizes whose product "
                                  "divides it")
        elif cfg.moe_intermediate_size % tp:
            raise ConfigError(f"{source}: moe_intermediate_size={cfg.moe_intermediate_size} is not divisible by "
                              f"tensor_parallel_size={tp} (without --enable-expert-parallel the experts are split by "
                              "TP); choose a TP size that divides it or enable expert parallel")

    def vocab_widths(self, cfg) -> list[int]:
        """Vocab rows of each TP rank, in TP order (the pieces the logits are gathered from)."""
        return [b - a for a, b in (split_range(cfg.vocab_size, self.tp, r) for r in range(self.tp))]

    def rank(self, cfg, rank: int) -> "RankPlacement":
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside a world of {self.world_size} ranks")
        dp_rank, tp_rank = divmod(rank, self.tp)
        H, G, E = cfg.num_attention_heads, cfg.o_groups, cfg.n_routed_experts
        h = split_range(H, self.tp, tp_rank)
        g = split_range(G, self.tp, tp_rank)
        v = split_range(cfg.vocab_size, self.tp, tp_rank)
        e = split_range(E, self.ep_size, rank) if self.ep else (0, E)
        inter = (0, cfg.moe_intermediate_size) if self.ep else split_range(cfg.moe_intermediate_size, self.tp, tp_rank)
        group = list(range(dp_rank * self.tp, (dp_rank + 1) * self.tp))
        return RankPlacement(self, rank, tp_rank, dp_rank, group, h, g, v, e, inter)


@dataclass(frozen=True)
class RankPlacement:
    """What one rank holds. Ranges are [start, stop)."""

    layout: ParallelConfig
    rank: int
    tp_rank: int
    dp_rank: int
    tp_group: list  # global ranks of this rank's TP group
    heads: tuple[int, int]
    o_groups: tuple[int, int]
    vocab: tuple[int, int]
    experts: tuple[int, int]  # routed experts held (all of them without EP)
    moe_inter: tuple[int, int]  # slice of every expert's intermediate dim (all of it with EP)

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_groups(self) -> int:
        return self.o_groups[1] - self.o_groups[0]

    @property
    def is_tp_leader(self) -> bool:
        return self.tp_rank == 0

    def owns_expert(self, e: int) -> bool:
        return self.experts[0] <= e < self.experts[1]

    def describe(self) -> str:
        lay = self.layout
        moe = (f"experts {self.experts[0]}-{self.experts[1] - 1}" if lay.ep else
               f"all experts, intermediate {self.moe_inter[0]}-{self.moe_inter[1] - 1}")
        return (f"rank {self.rank} (dp {self.dp_rank}, tp {self.tp_rank}): heads {self.heads[0]}-{self.heads[1] - 1}, "
                f"o_groups {self.o_groups[0]}-{self.o_groups[1] - 1}, {moe}, vocab {self.vocab[0]}-{self.vocab[1] - 1}")
