"""Wire a core into PD disaggregation: a prefill instance gets a `KvSender` (bootstrap server + transfer
threads), a decode instance gets `RemotePrefill` as its prefill executor. Both register their KV pool with
Mooncake and publish its layout."""

from __future__ import annotations

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.kv_transfer import MooncakeTransport, dtype_name
from semipd_runtime.pd_prefill import KvSender
from semipd_runtime.pd_types import KvLayout
from semipd_runtime.remote_prefill import RemotePrefill


def _transport(cfg: EngineConfig, core: EngineCore) -> tuple[MooncakeTransport, KvLayout]:
    pool = core.kv_pool
    transport = MooncakeTransport(cfg.semi_pd.disaggregation_host)
    transport.register(pool)
    layout = KvLayout(pool.page_size, dtype_name(pool.dtype), pool.num_layers, pool.num_kv_heads, pool.head_dim)
    return transport, layout


def attach_kv_sender(cfg: EngineConfig, core: EngineCore) -> None:
    transport, layout = _transport(cfg, core)
    pd = cfg.semi_pd
    core.kv_sender = KvSender(transport, layout, pd.disaggregation_host, pd.disaggregation_bootstrap_port,
                              cfg.scheduler.page_size)


def make_remote_prefill(cfg: EngineConfig, core: EngineCore) -> RemotePrefill:
    transport, layout = _transport(cfg, core)
    pd = cfg.semi_pd
    return RemotePrefill(transport, layout, pd.disaggregation_host, pd.disaggregation_bootstrap_port,
                         cfg.scheduler.page_size, cfg.scheduler.max_running_requests)
