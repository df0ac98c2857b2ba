"""mergekit's exact-k trim without a sort: which entries ``torch.argsort(|w|, descending=True)[:k]`` keeps.

mergekit (``sparsify.magnitude``, ``threshold_ties: sort`` here) keeps exactly k entries per
tensor, the first k of a CPU ``torch.argsort(w, descending=True)`` of the float32 magnitudes.
Which of the entries equal to the k-th largest magnitude survive is decided by the sort's
order among equal keys, and that order is not the index order.

What torch 2.13 runs there (read in ``aten/src/ATen/native/cpu/SortingKernel.cpp`` and checked by
experiment, ``tests/test_exact_k.py``): for a float32 key with ``stable=False`` the CPU wheel
sorts (value, index) pairs with libstdc++'s ``std::sort`` and the comparator ``a > b`` (NaN
first): an introsort (median-of-three pivot moved to the front, an unguarded Hoare partition,
heap sort once the depth limit 2·floor(log2 n) is spent, ranges of at most 16 left to a final
insertion sort). The same order comes out with ``ATEN_CPU_CAPABILITY`` default, avx2 and avx512
(the x86-simd-sort path is not taken for this call on those builds).

The selection needs only the ranges that contain position k: each partition is replayed
exactly, then only the side holding k is followed (a quickselect on the introsort's own
steps), about 2n comparisons instead of a sort. A final insertion sort never swaps equal keys
and never moves an entry out of its ≤16-entry range, so the range holding k decides the
rest with a stable insertion sort of its own. The result equals torch's bit for bit.
"""

from __future__ import annotations

from . import numba_cache  # on import, before numba: where its compiled kernels go

try:  # optional: without numba the engine runs the torch sort
    numba_cache.import_numba()  # its settings from NUMBA_* variables only (see there)
    from numba import njit
except ImportError:  # pragma: no cover - exercised where numba is absent
    njit = None

__all__ = ["INTROSORT_THRESHOLD", "sort_topk", "sort_two", "keep_mask", "band_mask"]

INTROSORT_THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this small wait for the final insertion sort


if njit is not None:

    @njit(inline="always")
    def _swap(keys, idx, a, b):  # pragma: no cover - compiled
        k = keys[a]
        keys[a] = keys[b]
        keys[b] = k
        i = idx[a]
        idx[a] = idx[b]
        idx[b] = i

    @njit(cache=True, nogil=True)
    def _adjust_heap(keys, idx, first, hole, length, vk, vi):  # pragma: no cover - compiled
        # std::__adjust_heap then std::__push_heap with comp(a, b) = a > b
        top = hole
        second = hole
        while second < (length - 1) // 2:
            second = 2 * (second + 1)
            if keys[first + second] > keys[first + second - 1]:
                second -= 1
            keys[first + hole] = keys[first + second]
            idx[first + hole] = idx[first + second]
            hole = second
        if (length & 1) == 0 and second == (length - 2) // 2:
            second = 2 * (second + 1)
            keys[first + hole] = keys[first + second - 1]
            idx[first + hole] = idx[first + second - 1]
            hole = second - 1
        parent = (hole - 1) // 2
        while hole > top and keys[first + parent] > vk:
            keys[first + hole] = keys[first + parent]
            idx[first + hole] = idx[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        keys[first + hole] = vk
        idx[first + hole] = vi

    @njit(cache=True, nogil=True)
    def _heap_sort(keys, idx, first, last):  # pragma: no cover - compiled
        # std::__partial_sort(first, last, last): make_heap, then sort_heap
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                _adjust_heap(keys, idx, first, parent, length, keys[first + parent], idx[first + parent])
                if parent == 0:
                    break
                parent -= 1
        end = last
        while end - first > 1:
            end -= 1
            vk = keys[end]
            vi = idx[end]
            keys[end] = keys[first]
            idx[end] = idx[first]
            _adjust_heap(keys, idx, first, 0, end - first, vk, vi)

    @njit(cache=True, nogil=True)
    def _insertion_sort(keys, idx, first, last):  # pragma: no cover - compiled
        # the final insertion sort restricted to one range: equal keys keep their order
        for i in range(first + 1, last):
            vk = keys[i]
            vi = idx[i]
            j = i
            while j > first and vk > keys[j - 1]:
                keys[j] = keys[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            keys[j] = vk
            idx[j] = vi

    @njit(cache=True, nogil=True)
    def _partition(keys, idx, first, last, left, right):  # pragma: no cover - compiled
        # std::__unguarded_partition(first + 1, last, first) with the pivot at first, in three
        # branch-free passes instead of its data-dependent scans: the i-th swap exchanges the
        # i-th entry <= pivot from the left (left[i]) with the i-th entry >= pivot from the right
        # (right[i]) while left[i] < right[i] (entries between the scans are untouched, so the
        # original positions are the scans' stops); the cut is where the left scan stops next:
        # left[s], or the last swapped right position if that comes first.
        pivot = keys[first]
        na = 0
        for j in range(first + 1, last):
            left[na] = j
            na += keys[j] <= pivot
        nb = 0
        for j in range(last - 1, first - 1, -1):  # the pivot itself stops the right scan at last
            right[nb] = j
            nb += keys[j] >= pivot
        s = 0
        m = min(na, nb)
        while s < m and left[s] < right[s]:
            s += 1
        for j in range(s):
            _swap(keys, idx, left[j], right[j])
        if s == 0:
            return left[0]  # median-of-three: an entry <= pivot exists right of first
        if s < na:
            return min(left[s], right[s - 1])
        return right[s - 1]

    @njit(cache=True, nogil=True)
    def _floor_log2(n):  # pragma: no cover - compiled
        r = 0
        while n > 1:
            n >>= 1
            r += 1
        return r

    @njit(cache=True, nogil=True)
    def _median_to_first(keys, idx, first, last):  # pragma: no cover - compiled
        # std::__move_median_to_first(first, first + 1, mid, last - 1)
        a = first + 1
        b = first + (last - first) // 2
        c = last - 1
        if keys[a] > keys[b]:
            if keys[b] > keys[c]:
                _swap(keys, idx, first, b)
            elif keys[a] > keys[c]:
                _swap(keys, idx, first, c)
            else:
                _swap(keys, idx, first, a)
        elif keys[a] > keys[c]:
            _swap(keys, idx, first, a)
        elif keys[b] > keys[c]:
            _swap(keys, idx, first, c)
        else:
            _swap(keys, idx, first, b)

    @njit(cache=True, nogil=True)
    def _topk_range(keys, idx, k, first, last, depth, left, right):  # pragma: no cover - compiled
        # the introsort's steps on [first, last) with depth levels left, following only the side
        # that holds position k, until the entries before k are the sort's
        while first < k < last:
            if last - first <= INTROSORT_THRESHOLD:
                _insertion_sort(keys, idx, first, last)
                return
            if depth == 0:
                _heap_sort(keys, idx, first, last)
                return
            depth -= 1
            _median_to_first(keys, idx, first, last)
            lo = _partition(keys, idx, first, last, left, right)
            if k <= lo:  # [first, lo) holds position k's side, or ends at it
                last = lo
            else:
                first = lo

    @njit(cache=True, nogil=True)
    def sort_topk(keys, idx, k, left, right):  # pragma: no cover - compiled
        """Rearrange (keys, idx) (E,) as std::sort(desc) would, only where it decides position k:
        afterwards idx[:k] holds the indices of the first k entries of the sorted order. keys must
        be finite (the NaN-first comparator is not replayed); left, right: (E,) scratch like idx."""
        last = keys.shape[0]
        _topk_range(keys, idx, k, 0, last, 2 * _floor_log2(last) if last > 0 else 0, left, right)

    @njit(cache=True, nogil=True)
    def sort_two(keys, idx, k1, k2, left, right):  # pragma: no cover - compiled
        """As :func:`sort_topk` for two positions k1 <= k2: afterwards idx[:k1] and idx[:k2] hold
        the first k1 and k2 entries of std::sort(desc)'s order. Both paths are followed from the
        partition where they part (the sort treats the two sides independently, with the same
        depth left), so the cost is about two selections."""
        first = 0
        last = keys.shape[0]
        depth = 2 * _floor_log2(last) if last > 0 else 0
        while first < k1 < last and first < k2 < last:
            if last - first <= INTROSORT_THRESHOLD:
                _insertion_sort(keys, idx, first, last)
                return
            if depth == 0:
                _heap_sort(keys, idx, first, last)
                return
            depth -= 1
            _median_to_first(keys, idx, first, last)
            lo = _partition(keys, idx, first, last, left, right)
            if k2 <= lo:
                last = lo
            elif k1 > lo:
                first = lo
            else:  # k1 <= lo < k2: the two sides go their own ways
                _topk_range(keys, idx, k1, first, lo, depth, left, right)
                _topk_range(keys, idx, k2, lo, last, depth, left, right)
                return
        _topk_range(keys, idx, k1, first, last, depth, left, right)
        _topk_range(keys, idx, k2, first, last, depth, left, right)

    @njit(cache=True, nogil=True)
    def band_mask(keys, idx, lo, hi, mask, left, right):  # pragma: no cover - compiled
        """mask (E,) uint8 (zeroed) := 1 where torch.argsort(keys, descending=True)[lo:hi] points
        (with keys = -|tau|: positions lo..hi of torch.sort(|tau|)'s ascending order, as
        a < b on |tau| is -a > -b on the negated keys). Scratch as :func:`keep_mask`."""
        for j in range(keys.shape[0]):
            idx[j] = j
        sort_two(keys, idx, lo, hi, left, right)
        for j in range(lo, hi):
            mask[idx[j]] = 1

    @njit(cache=True, nogil=True)
    def keep_mask(keys, idx, k, mask, left, right):  # pragma: no cover - compiled
        """mask (E,) uint8 (zeroed) := 1 where torch.argsort(keys, descending=True)[:k] points. keys (E,)
        finite float32 and idx, left, right (E,) scratch (int32 below 2**31 entries, else int64) are
        consumed."""
        for j in range(keys.shape[0]):
            idx[j] = j
        sort_topk(keys, idx, k, left, right)
        for j in range(k):
            mask[idx[j]] = 1
