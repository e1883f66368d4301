"""ClusterKV cache layer: full K/V kept, decode attention reads only a budget of tokens.

Paper: "ClusterKV: Manipulating LLM KV Cache in Semantic Space for Recallable
Compression". This file is copied flat into exported checkpoints: it imports only torch,
transformers and its sibling modules.

Token order inside a layer is the order of positions, so column ``j`` of the attention
mask is token ``j`` of the layer for every batch row. Regions of one batch row, seen from
a query at position ``p``::

    [ sinks | clustered segments ... | pending | recent window | p ]
      exact    selected by budget      exact     exact          exact

* After the dense prefill, at the first decode step, the keys between the sinks and the
  recent window are clustered per kv head (spherical k-means, about ``tokens_per_cluster``
  tokens per cluster): the prefill segment.
* Tokens leaving the window become *pending* (attended exactly); when ``append_every`` of
  them have accumulated they are clustered into ``append_clusters`` new clusters appended
  to the existing ones (old clusters are never re-clustered).
* A decode step scores every centroid against the query, takes whole clusters in
  descending score order (the last one truncated) and attends exactly over those plus
  sinks, pending, window and the current token. ``budget`` counts every token read
  outside the sinks and the window: pending tokens first, selected cluster members fill
  the rest. A step therefore reads at most ``sinks + window + budget + 1`` tokens, the
  figure a sink+window cache of the same budget is compared with.

With ``estimate_rest=True`` what the budget leaves out is not dropped: every cluster that
is not read whole stands in for its unread members as one pseudo-token, key its centroid
counted ``log(unread)`` times (logit ``scale * q.c + log(unread)``) and value the mean value
of its members, merged into the same softmax (log-sum-exp) as the exact tokens. Attention
mass on unselected clusters then moves the output toward their mean values instead of
being renormalised onto the selection; reads ``C`` mean values more per step (the
centroids are read for scoring anyway). ``exp(q.c)`` is at most the members' mean
``exp(q.k)`` (Jensen): the unread mass is never overestimated. A correction for the
clusters' spread (``q' Sigma q / 2``, isotropic, scaled down) lowered the attention-output
error on calibration windows but raised SmolLM2's perplexity; it is not made.

With ``spread_ranking=True`` the clusters are *ranked* by an estimate of their members'
mean ``exp(scale * q.k)`` instead of ``exp(scale * q.c)``: with the members' per-channel
key variance ``var`` (kept per cluster, fp32), ``q.c + scale / 2 * sum_j q_j^2 var_j``
(the log mean exp of a Gaussian with that diagonal covariance). A cluster with one key
that matches the query and many that do not has a low mean logit but most of the mass;
the centroid alone ranks it below flatter clusters, the spread term does not. Costs one
more ``C x d`` product per step and ``C x d`` fp32 of state. Only the ranking changes:
the ``estimate_rest`` logits stay ``scale * q.c + log(unread)``. One variance per cluster
(isotropic, ``C`` floats) was tried: SmolLM2's perplexity over three texts at budget 512
moved 1.024x -> 1.022x against 1.016x with the per-channel variance.

Steps of several queries after a past (teacher forcing, a question after a document,
speculative verification; up to ``SPARSE_CHUNK`` queries) give each query its own
selection, as if the tokens came one at a time; longer ones (chunked prefill) and the first
prefill attend densely.

Without offload the full K/V stays in device memory: the saving is bandwidth, a decode step
reads ``budget`` clustered tokens instead of all of them. With ``offload=True`` the full
K/V lives in (pinned) host memory and the device keeps only the centroids, the cluster
metadata and the working set of the last step (sinks, pending, window, selected tokens,
new tokens); each step copies in only the tokens of its working set that were not in the
previous one (``h2d_bytes`` counts them).
"""

from __future__ import annotations

import torch

from ..kernels.clusterkv import kmeans, kmeans_update, select_clusters, sparse_attention
from .kvs_layer import CompressedLayer

# K/V storage grows by blocks of this many tokens: one reallocation per block keeps
# appends amortised O(1).
KV_BLOCK = 256
# Multi-query steps after a past up to this length read sparsely (one selection per query);
# longer ones are chunked prefill and attend densely.
SPARSE_CHUNK = 512


class ClusterKVLayer(CompressedLayer):
    """One layer of a ClusterKV cache.

    State (allocated on first ``update``; every tensor has the batch dimension first):
      ``_k``/``_v`` ``(B, H_kv, capacity, d)`` all tokens, model dtype (``keys``/``values``
      are views of the first ``seen`` positions; on the host when offloading);
      ``centroids`` ``(B, H_kv, C, d)`` fp32; ``vmeans`` ``(B, H_kv, C, dv)`` fp32 the
      members' mean value (last dim 0 unless ``estimate_rest``); ``kvars`` ``(B, H_kv,
      C, d)`` fp32 the members' per-channel key variance (last dim 0 unless
      ``spread_ranking``); ``sizes`` ``(B, H_kv, C)``
      int32 members per cluster; ``offsets`` ``(B, H_kv, C)`` int32 start of each cluster in
      ``sorted_ids`` ``(B, H_kv, N)`` int32 token positions ordered by cluster (cluster c
      occupies ``sorted_ids[..., offsets[c] : offsets[c] + sizes[c]]``);
      offload only: ``_res_k``/``_res_v`` ``(B, H_kv, R, d)`` the device-resident working
      set, ``_res_pos`` ``(B, H_kv, R)`` int64 its positions, ascending (-1 = empty slot).
    C and N are shared by the batch rows: a row with fewer valid (unpadded) tokens in a
    segment gets zero-size clusters and unused slots at the end of the segment.

    Settings: ``budget`` tokens read per step and kv head besides sinks and window (pending
    first, then selected cluster members); ``sinks`` first tokens and ``window`` last
    tokens always exact; ``tokens_per_cluster`` sets the prefill cluster count
    (``ceil(n / tokens_per_cluster)``); ``append_every`` / ``append_clusters`` the
    incremental clustering; ``kmeans_iters`` and ``seed`` the k-means; ``offload`` keeps the
    full K/V on the host; ``estimate_rest`` adds the unread members of every cluster as
    one pseudo-token and ``spread_ranking`` ranks clusters with their key spread (see the
    module docstring).
    """

    def __init__(
        self,
        *,
        budget=1024,
        sinks=16,
        window=128,
        tokens_per_cluster=80,
        append_every=320,
        append_clusters=8,
        kmeans_iters=20,
        seed=0,
        offload=False,
        estimate_rest=False,
        spread_ranking=False,
    ):
        super().__init__()
        self.budget, self.sinks, self.window = int(budget), int(sinks), int(window)
        self.tokens_per_cluster = int(tokens_per_cluster)
        self.append_every, self.append_clusters = int(append_every), int(append_clusters)
        self.kmeans_iters, self.seed = int(kmeans_iters), int(seed)
        self.offload_kv = bool(offload)
        self.estimate_rest = bool(estimate_rest)
        self.spread_ranking = bool(spread_ranking)
        for name in ("budget", "sinks", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"ClusterKVLayer {name} must be >= 0, got {getattr(self, name)}")
        for name in ("tokens_per_cluster", "append_every", "append_clusters", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClusterKVLayer {name} must be >= 1, got {getattr(self, name)}")
        self.seen = 0
        self.last_had_past = False
        self.h2d_bytes = 0  # offload: bytes copied host -> device (clustering + recalls)
        # one entry per clustered segment: (tok_start, tok_end, c_start, c_end, s_start, s_end)
        self.segments: list[tuple[int, int, int, int, int, int]] = []

    # -- allocation -------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        host = torch.device("cpu") if self.offload_kv else self.device
        self._k = torch.zeros(b, h, 0, d, dtype=self.dtype, device=host)
        self._v = torch.zeros(b, h, 0, dv, dtype=value_states.dtype, device=host)
        self.centroids = torch.zeros(b, h, 0, d, dtype=torch.float32, device=self.device)
        dm = dv if self.estimate_rest else 0
        self.vmeans = torch.zeros(b, h, 0, dm, dtype=torch.float32, device=self.device)
        dk = d if self.spread_ranking else 0
        self.kvars = torch.zeros(b, h, 0, dk, dtype=torch.float32, device=self.device)
        self.sizes = torch.zeros(b, h, 0, dtype=torch.int32, device=self.device)
        self.offsets = torch.zeros(b, h, 0, dtype=torch.int32, device=self.device)
        self.sorted_ids = torch.zeros(b, h, 0, dtype=torch.int32, device=self.device)
        self._res_k = key_states.new_zeros(b, h, 0, d)
        self._res_v = value_states.new_zeros(b, h, 0, dv)
        self._res_pos = torch.zeros(b, h, 0, dtype=torch.int64, device=self.device)
        self.segments = []
        self._views()
        self.is_initialized = True

    def _views(self):
        self.keys = self._k[:, :, : self.seen]
        self.values = self._v[:, :, : self.seen]

    def _reserve(self, need: int) -> None:
        cap = self._k.shape[2]
        if need <= cap:
            return
        new_cap = -(-need // KV_BLOCK) * KV_BLOCK
        pin = self.offload_kv and self.device.type == "cuda"  # async copies need pinned pages

        def grow(t):
            out = torch.zeros(
                *t.shape[:2], new_cap, t.shape[3], dtype=t.dtype, device=t.device, pin_memory=pin
            )
            out[:, :, : self.seen] = t[:, :, : self.seen]
            return out

        self._k, self._v = grow(self._k), grow(self._v)

    # -- cache verbs ------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """Store new tokens ``(B, H_kv, T, d)``; returns them unchanged (prefill attention is dense)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.last_had_past = self.seen > 0
        b, h, t, _ = key_states.shape
        # the stored state is not differentiable (clusters, selections): keep no graph
        k, v = key_states.detach(), value_states.detach()
        self._reserve(self.seen + t)
        self._k[:, :, self.seen : self.seen + t] = k.to(self._k.device)
        self._v[:, :, self.seen : self.seen + t] = v.to(self._v.device)
        if self.offload_kv:
            # new tokens arrive on the device: they join the working set without a copy.
            # Their positions exceed every resident one, so _res_pos stays ascending.
            pos = torch.arange(self.seen, self.seen + t, device=self.device).expand(b, h, t)
            self._res_k = torch.cat([self._res_k, k], dim=2)
            self._res_v = torch.cat([self._res_v, v], dim=2)
            self._res_pos = torch.cat([self._res_pos, pos], dim=2)
        self.seen += t
        self._views()
        return key_states, value_states

    @property
    def n_clusters(self) -> int:
        return self.segments[-1][3] if self.segments else 0

    @property
    def n_comp(self) -> int:
        """Tokens in clustered segments (read only when selected), as evaluation counts them."""
        return sum(s[1] - s[0] for s in self.segments)

    @property
    def clustered_end(self) -> int:
        """First position after the clustered segments (the sinks' end when there are none)."""
        return self.segments[-1][1] if self.segments else min(self.sinks, self.seen)

    # -- clustering -------------------------------------------------------------------
    def _cluster_segment(self, t0: int, t1: int, valid: torch.Tensor, n_clusters) -> None:
        """Cluster tokens ``[t0, t1)`` (the valid ones of each row) into a new segment.

        ``valid`` ``(B, seen)`` bool; ``n_clusters(m)`` gives a row's cluster count for its
        ``m`` valid tokens. Padded tokens get no cluster, so no budget is spent on them.
        """
        B, H, _, d = self._k.shape
        M = t1 - t0
        dev = self.device
        c0, s0 = self.n_clusters, self.sorted_ids.shape[2]
        seed = self.seed + len(self.segments)
        keys = self._k[:, :, t0:t1]
        if keys.device != dev:  # offload: k-means runs where the compute is
            keys = keys.to(dev)
            self.h2d_bytes += keys.numel() * keys.element_size()
        vseg = valid[:, t0:t1]
        rows = []  # (row indices, valid token positions relative to t0, C, cent, labels)
        if bool(vseg.all()):
            C = n_clusters(M)
            cent, lab = kmeans(keys.reshape(B * H, M, d), C, self.kmeans_iters, seed)
            pos = torch.arange(M, device=dev)
            rows.append((slice(None), pos, C, cent.view(B, H, C, d), lab.view(B, H, M)))
        else:
            for b in range(B):
                pos = vseg[b].nonzero().squeeze(1)
                m = pos.numel()
                if m == 0:
                    continue
                C = n_clusters(m)
                cent, lab = kmeans(keys[b][:, pos], C, self.kmeans_iters, seed)
                rows.append((slice(b, b + 1), pos, C, cent[None], lab[None]))
        c_new = max((r[2] for r in rows), default=0)
        cent_all = torch.zeros(B, H, c_new, d, dtype=torch.float32, device=dev)
        vmean_all = torch.zeros(B, H, c_new, self.vmeans.shape[3], dtype=torch.float32, device=dev)
        kvar_all = torch.zeros(B, H, c_new, self.kvars.shape[3], dtype=torch.float32, device=dev)
        sizes = torch.zeros(B, H, c_new, dtype=torch.int32, device=dev)
        offsets = torch.full((B, H, c_new), s0, dtype=torch.int32, device=dev)
        ids = torch.zeros(B, H, M, dtype=torch.int32, device=dev)
        for sel, pos, C, cent, lab in rows:
            m = pos.numel()
            cnt = torch.zeros(*lab.shape[:2], C, dtype=torch.int64, device=dev)
            cnt.scatter_add_(2, lab, torch.ones_like(lab))
            order = torch.sort(lab, dim=-1, stable=True).indices  # cluster by cluster
            cent_all[sel, :, :C] = cent
            if self.estimate_rest:  # mean value per cluster, summed where the values live
                vals = self._v[sel, :, t0:t1][:, :, pos.to(self._v.device)]
                vmean_all[sel, :, :C] = _member_means(vals, lab.to(vals.device), C).to(dev)
            if self.spread_ranking:  # E[k^2] - c^2: the centroids are the members' means
                kf = keys[sel][:, :, pos].float()
                var = _member_means(kf * kf, lab, C) - cent * cent
                kvar_all[sel, :, :C] = var.clamp(min=0)
            sizes[sel, :, :C] = cnt.to(torch.int32)
            offsets[sel, :, :C] = (s0 + torch.cumsum(cnt, -1) - cnt).to(torch.int32)
            ids[sel, :, :m] = (t0 + pos[order]).to(torch.int32)
        self.centroids = torch.cat([self.centroids, cent_all], dim=2)
        self.vmeans = torch.cat([self.vmeans, vmean_all], dim=2)
        self.kvars = torch.cat([self.kvars, kvar_all], dim=2)
        self.sizes = torch.cat([self.sizes, sizes], dim=2)
        self.offsets = torch.cat([self.offsets, offsets], dim=2)
        self.sorted_ids = torch.cat([self.sorted_ids, ids], dim=2)
        self.segments.append((t0, t1, c0, c0 + c_new, s0, s0 + M))

    def _maybe_cluster(self, valid: torch.Tensor, pos: int | None = None) -> None:
        """Cluster what has left the recent window of the query at ``pos`` (default: the
        newest token); called at decode steps, before scoring."""
        pos = self.seen - 1 if pos is None else pos
        limit = pos - self.window  # positions < limit have left the window
        if not self.segments:
            t0 = min(self.sinks, self.seen)
            if limit > t0:
                tpc = self.tokens_per_cluster
                self._cluster_segment(t0, limit, valid, lambda m: -(-m // tpc))
            return
        k = self.append_clusters
        while self.clustered_end + self.append_every <= limit:
            t0 = self.clustered_end
            self._cluster_segment(t0, t0 + self.append_every, valid, lambda m: min(k, m))

    # -- attention --------------------------------------------------------------------

    def select_budget(self, pos: int | None = None) -> int:
        """Cluster members a query at ``pos`` may select: ``budget`` less its pending tokens."""
        pos = self.seen - 1 if pos is None else pos
        pending = max(0, pos - self.window - self.clustered_end)
        return max(0, min(self.budget - pending, self.sorted_ids.shape[2]))

    def select_tokens(self, query, valid, pos: int | None = None, scaling: float | None = None):
        """Token positions one query (at position ``pos``, default the newest) attends to.

        ``query`` ``(B, H, 1, d)``; ``valid`` ``(B, seen)`` bool (the query's mask row);
        ``scaling`` the attention scale (default ``d ** -0.5``; ``spread_ranking`` uses it).
        Returns ``(index (B, H_kv, L) int64, n_valid (B, H_kv) int64)``: the first
        ``n_valid`` entries are the valid exact tokens (sinks, pending, window, current)
        followed by the valid selected cluster members; the rest is padding.
        """
        return self._select(query, valid, pos, scaling)[:2]

    def _select(self, query, valid, pos: int | None, scaling: float | None = None):
        """:meth:`select_tokens` plus, with ``estimate_rest``, the unread members per
        cluster ``(B, H_kv, C)`` int64 (None otherwise) and the centroid scores ``q.c``
        ``(B, H_kv, C, g)`` fp32 of the group's query heads (None when nothing uses them:
        no clusters, or no budget left and no estimate)."""
        B, H_kv, _, d = self._k.shape
        H = query.shape[1]
        g = H // H_kv
        dev = query.device
        n_s = min(self.sinks, self.seen)
        ce = self.clustered_end
        exact = torch.cat([torch.arange(n_s, device=dev), torch.arange(ce, self.seen, device=dev)])
        E = exact.numel()
        ids = exact.expand(B, H_kv, E)
        ok = valid[:, exact][:, None].expand(B, H_kv, E)
        budget = self.select_budget(pos)
        rest = scores = None
        if self.n_clusters and (budget or self.estimate_rest):
            qg = query[:, :, 0].float().reshape(B, H_kv, g, d)
            scores = torch.matmul(self.centroids, qg.transpose(-1, -2))  # (B, H_kv, C, g)
            if self.estimate_rest:
                rest = self.sizes.long()
        if self.n_clusters and budget:
            rank = scores
            if self.spread_ranking:  # + scale/2 * q^2 . var: log mean exp over the members
                spread = torch.matmul(self.kvars, (qg * qg).transpose(-1, -2))
                scaling = d**-0.5 if scaling is None else scaling
                rank = scores + (0.5 * scaling) * spread
            # GQA: score a cluster by the MAX over the group's query heads. Under softmax
            # a head's attention mass on a cluster is dominated by its largest logit, so
            # a cluster that one head needs must be kept even if another head's logits
            # for it are low (those get ~0 weight anyway); a sum would let such negative
            # logits cancel it. q.c = mean member logit, since c is the members' mean.
            sc = rank.amax(-1)  # (B, H_kv, C)
            sel, n_sel = select_clusters(
                sc.reshape(B * H_kv, -1),
                self.sizes.reshape(B * H_kv, -1),
                budget,
                self.offsets.reshape(B * H_kv, -1),
            )
            tok = self.sorted_ids.reshape(B * H_kv, -1).gather(1, sel).long()
            tok = tok.view(B, H_kv, budget)
            live = torch.arange(budget, device=dev) < n_sel.view(B, H_kv, 1)
            if rest is not None:  # read members per cluster, from the slots of sorted_ids
                mark = torch.zeros(
                    B * H_kv, self.sorted_ids.shape[2] + 1, dtype=torch.long, device=dev
                )
                mark.scatter_add_(1, 1 + sel.long(), live.view(B * H_kv, budget).long())
                cum = torch.cumsum(mark, 1)  # cum[:, j]: read slots before slot j
                lo = self.offsets.reshape(B * H_kv, -1).long()
                hi = lo + self.sizes.reshape(B * H_kv, -1).long()
                rest = rest - (cum.gather(1, hi) - cum.gather(1, lo)).view_as(rest)
            # the current mask still applies (normally these tokens were valid when clustered)
            live = live & valid[:, None].expand(B, H_kv, self.seen).gather(2, tok)
            ids = torch.cat([ids, tok], dim=2)
            ok = torch.cat([ok, live], dim=2)
        # compact: valid entries first, in order, so the kernel reads a dense prefix
        L = ids.shape[2]
        dest = torch.where(ok, torch.cumsum(ok.long(), dim=2) - 1, L)
        index = torch.zeros(B, H_kv, L + 1, dtype=torch.int64, device=dev)
        index.scatter_(2, dest, ids.long())
        return index[:, :, :L], ok.sum(2), rest, scores

    def _dense(self, query, allowed, scaling):
        """Exact attention over every token, fp32; fully masked rows give zeros."""
        B, H, q_len, d = query.shape
        H_kv = self._k.shape[1]
        g = H // H_kv
        k = self.keys.to(query.device, torch.float32)
        v = self.values.to(query.device, torch.float32)
        qg = query.float().reshape(B, H_kv, g * q_len, d)
        s = torch.matmul(qg, k.transpose(-1, -2)).view(B, H_kv, g, q_len, -1) * scaling
        s = s.masked_fill(~allowed[:, None, None], float("-inf"))
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        p = torch.exp(s - mx)
        den = p.sum(-1, keepdim=True)
        p = p * torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
        out = torch.matmul(p.view(B, H_kv, g * q_len, -1), v).view(B, H, q_len, -1)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def _recall(self, index, n_valid):
        """Offload: the working set ``index`` ``(B, H_kv, L)`` as device tensors ``(B, H_kv,
        L, d)``, copying in only the tokens not resident after the previous step; it then
        becomes the resident set."""
        L = index.shape[2]
        live = torch.arange(L, device=index.device) < n_valid[..., None]
        need = torch.where(live, index, torch.full_like(index, -2))  # -2 matches no slot
        R = self._res_pos.shape[2]
        d, dv = self._res_k.shape[3], self._res_v.shape[3]
        if R:
            j = torch.searchsorted(self._res_pos, need).clamp(max=R - 1)
            hit = live & (self._res_pos.gather(2, j) == need)
            kc = self._res_k.gather(2, j[..., None].expand(*j.shape, d))
            vc = self._res_v.gather(2, j[..., None].expand(*j.shape, dv))
        else:
            hit = torch.zeros_like(live)
            kc = self._res_k.new_zeros(*index.shape, d)
            vc = self._res_v.new_zeros(*index.shape, dv)
        miss = live & ~hit
        if bool(miss.any()):
            b, h, jj = miss.nonzero(as_tuple=True)
            p = need[b, h, jj]
            hb, hh, hp = b.cpu(), h.cpu(), p.cpu()
            k_in = self._k[hb, hh, hp].to(kc.device, non_blocking=True)
            v_in = self._v[hb, hh, hp].to(vc.device, non_blocking=True)
            kc[b, h, jj] = k_in
            vc[b, h, jj] = v_in
            self.h2d_bytes += k_in.numel() * k_in.element_size()
            self.h2d_bytes += v_in.numel() * v_in.element_size()
        kc = torch.where(live[..., None], kc, torch.zeros_like(kc))
        vc = torch.where(live[..., None], vc, torch.zeros_like(vc))
        pos = torch.where(live, index, torch.full_like(index, -1))
        order = torch.argsort(pos, dim=2)
        self._res_pos = pos.gather(2, order)
        self._res_k = kc.gather(2, order[..., None].expand(*order.shape, d))
        self._res_v = vc.gather(2, order[..., None].expand(*order.shape, dv))
        return kc, vc

    def _attend_one(self, query, valid, pos, scaling):
        """``query`` ``(B, H, 1, d)`` at position ``pos`` with mask row ``valid`` ``(B, seen)``."""
        index, n_valid, rest, scores = self._select(query, valid, pos, scaling)
        lse = rest is not None
        if not self.offload_kv:
            out = sparse_attention(query, self.keys, self.values, index, n_valid, scaling, lse)
        else:
            kc, vc = self._recall(index, n_valid)
            # same entries in the same order as without offload, so the same numbers
            local = torch.arange(index.shape[2], device=index.device).expand_as(index)
            out = sparse_attention(query, kc, vc, local, n_valid, scaling, lse)
        return self._merge_rest(out, rest, scores, scaling) if lse else out

    def _merge_rest(self, attended, rest, scores, scaling):
        """Fold the unread cluster members into the attention output (``estimate_rest``).

        ``attended`` ``((B, H, 1, dv), lse (B, H))`` from the exact tokens; every cluster
        with ``rest > 0`` unread members is a pseudo-token of logit ``scaling * q.c +
        log(rest)`` and value its mean value. Returns ``(B, H, 1, dv)`` in the query dtype.
        """
        out, lse = attended
        B, H, _, dv = out.shape
        H_kv, g = self.centroids.shape[1], scores.shape[3]
        logit = scores.transpose(-1, -2) * scaling + torch.log(rest.float())[:, :, None]
        lse_r = torch.logsumexp(logit, -1)  # (B, H_kv, g); -inf when nothing is unread
        p = torch.exp(logit - torch.where(torch.isinf(lse_r), 0.0, lse_r)[..., None])
        o_r = torch.matmul(p, self.vmeans)  # (B, H_kv, g, dv), normalised where lse_r > -inf
        lse_a = lse.view(B, H_kv, g)
        m = torch.maximum(lse_a, lse_r)
        m = torch.where(torch.isinf(m), 0.0, m)
        w_a, w_r = torch.exp(lse_a - m), torch.exp(lse_r - m)
        den = w_a + w_r
        den = torch.where(den > 0, den, 1.0)
        o_a = out.float().view(B, H_kv, g, dv)
        res = (w_a[..., None] * o_a + w_r[..., None] * o_r) / den[..., None]
        return res.view(B, H, 1, dv).to(out.dtype)

    def attend(self, query, attention_mask, scaling):
        """Attention of ``query`` ``(B, H, Q, d)`` over everything this layer holds.

        ``attention_mask``: bool ``(B, 1, Q, seen)`` (True = attend), additive float, or
        None (then causal). Each query of a step of at most ``SPARSE_CHUNK`` reads its own
        budgeted selection; longer steps are exact. Returns ``(B, Q, H, d)``.
        """
        q_len = query.shape[2]
        allowed = self._valid_mask(attention_mask, q_len, self._k.shape[0], query.device)
        if q_len > SPARSE_CHUNK:
            return self._dense(query, allowed, scaling)
        first = self.seen - q_len
        self._maybe_cluster(allowed[:, 0], first)
        outs = [
            self._attend_one(query[:, :, i : i + 1], allowed[:, i], first + i, scaling)
            for i in range(q_len)
        ]
        out = outs[0] if q_len == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous()

    # -- bookkeeping ------------------------------------------------------------------
    # cluster state: always on the device, offloading or not
    _CLUSTER_STATE = ("centroids", "vmeans", "kvars", "sizes", "offsets", "sorted_ids")

    def _tensors(self):
        return ("_k", "_v") + self._CLUSTER_STATE + self._resident()

    @staticmethod
    def _resident() -> tuple[str, ...]:
        return ("_res_k", "_res_v", "_res_pos")

    def device_tensors(self) -> tuple[str, ...]:
        """Names of the state tensors held in device memory (with offload: all but the K/V)."""
        if self.offload_kv:
            return self._CLUSTER_STATE + self._resident()
        return self._tensors()

    def nbytes(self) -> int:
        """Device bytes this layer has allocated (measured storages); with offload the host
        K/V is not counted (see :meth:`host_nbytes`)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).untyped_storage().nbytes() for n in self.device_tensors())

    def host_nbytes(self) -> int:
        """Bytes of the host-side K/V (0 without offload)."""
        if not (self.is_initialized and self.offload_kv):
            return 0
        return self._k.untyped_storage().nbytes() + self._v.untyped_storage().nbytes()

    def _after_batch_map(self) -> None:
        self._views()

    def offload(self):
        """Move all state to CPU (transformers' offloading hook)."""
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.centroids.device != self.device:
            keep_host = set() if not self.offload_kv else {"_k", "_v"}
            for n in self._tensors():
                if n not in keep_host:
                    setattr(self, n, getattr(self, n).to(self.device, non_blocking=True))
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (negative count, as transformers passes).

        Clustered segments that reach into the new recent window (or past the new end)
        are dropped whole: their tokens become pending (exact) again and are re-clustered
        when they leave the window, as if the removed tokens had never been generated.
        """
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.seen
        n = min(-tokens_to_remove, self.seen)
        if n <= 0 or not self.is_initialized:
            return
        self.seen -= n
        while self.segments and self.segments[-1][1] > self.seen - self.window:
            self.segments.pop()
        c_end = self.segments[-1][3] if self.segments else 0
        s_end = self.segments[-1][5] if self.segments else 0
        self.centroids = self.centroids[:, :, :c_end]
        self.vmeans = self.vmeans[:, :, :c_end]
        self.kvars = self.kvars[:, :, :c_end]
        self.sizes = self.sizes[:, :, :c_end]
        self.offsets = self.offsets[:, :, :c_end]
        self.sorted_ids = self.sorted_ids[:, :, :s_end]
        if self._res_pos.shape[2]:  # removed tokens leave the working set (kept ascending)
            pos = torch.where(self._res_pos >= self.seen, -1, self._res_pos)
            order = torch.argsort(pos, dim=2)
            self._res_pos = pos.gather(2, order)
            for n_ in ("_res_k", "_res_v"):
                t = getattr(self, n_)
                setattr(self, n_, t.gather(2, order[..., None].expand(*order.shape, t.shape[3])))
        self._views()

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.segments = []
        self.h2d_bytes = 0
        self.keys = self.values = None


def _member_means(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """``(B, H, C, e)`` fp32 mean of ``x`` ``(B, H, M, e)`` over each cluster's members
    (``labels`` ``(B, H, M)``; an empty cluster gets zeros): the k-means update step."""
    B, H, M, e = x.shape
    flat = kmeans_update(x.reshape(B * H, M, e), labels.reshape(B * H, M), n_clusters)[0]
    return flat.view(B, H, n_clusters, e)


# -- method interface (see kvs_methods.py) -------------------------------------------------
BUFFERS: tuple[str, ...] = ()  # ClusterKV learns settings, not tensors
# Settings a layer spec may carry (calibrated per layer); the block's globals fill the rest.
LAYER_KEYS = ("budget", "tokens_per_cluster")
GLOBAL_KEYS = ("sinks", "window", "append_every", "append_clusters", "kmeans_iters", "seed")
# optional booleans of the block (default False)
FLAG_KEYS = ("offload", "estimate_rest", "spread_ranking")


def _setting(spec: dict, block: dict, key: str):
    return spec[key] if key in spec else block.get(key)


def validate(block: dict, num_layers: int) -> None:
    """Check the ClusterKV settings of a ``kvsurgery`` config block."""
    minimum = {"sinks": 0, "window": 0, "seed": 0, "budget": 0}
    for key in FLAG_KEYS:
        if not isinstance(block.get(key, False), bool):
            raise ValueError(f"config.kvsurgery.{key} must be true or false, got {block[key]!r}.")
    for i, spec in enumerate(block["layers"]):
        if spec.get("dense"):
            continue
        for key in LAYER_KEYS + GLOBAL_KEYS:
            v = _setting(spec, block, key)
            lo = minimum.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                where = f"layers[{i}].{key}" if key in spec else key
                raise ValueError(f"config.kvsurgery.{where} must be an int >= {lo}, got {v!r}.")


def install_layer(mod, spec: dict, block: dict, tensors: dict | None) -> None:
    """Nothing to store on the module: the layer is built from the settings alone."""


def prepare_layer(i: int, mod, spec: dict, block: dict) -> None:
    """No derived state."""


def make_layer(mod, spec: dict, block: dict) -> ClusterKVLayer:
    kw = {k: _setting(spec, block, k) for k in LAYER_KEYS + GLOBAL_KEYS}
    return ClusterKVLayer(**kw, **{k: bool(block.get(k, False)) for k in FLAG_KEYS})
