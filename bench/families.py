"""The input families of the approximation error: their names, what each models, and their record fields.

Each family models one kind of structure real attention has, the structure some approximate mechanism
bets on; bench.measure.inputs draws them. Never imports torch: reports are rebuilt from ``results/`` alone.
"""

from __future__ import annotations

PEAKED_SCORE_STD = 4.0  # peaked: the timed q and k scaled so that the attention scores have this standard deviation
LOCAL_WIDTH = 64.0  # local: tokens this many positions apart still look alike (scale of the position code)
LOW_RANK = 8  # low_rank: dimension of the subspace queries and keys lie in
CLUSTERS = 16  # clustered: centres per head

ERROR_ROWS = 1024  # query rows an error compares at most (evenly spaced over the sequence beyond that)

# family -> what real attention it stands for, in the order reports show them
FAMILIES = {
    "random": "no structure: standard normal q, k, v (the timed inputs); nearly uniform attention",
    "peaked": f"sharp attention anywhere: the timed q and k scaled so that the scores' spread is {PEAKED_SCORE_STD:g}",
    "local": f"attention to nearby tokens: q and k coded by position (kernel width {LOCAL_WIDTH:g} tokens), smooth "
    "values",
    "low_rank": f"scores of rank {LOW_RANK}: queries and keys from a {LOW_RANK}-dimensional subspace, values from the "
    "same latent",
    "clustered": f"content clusters: q and k near one of {CLUSTERS} centres, a cluster's tokens spread over the "
    "sequence, values by cluster",
}
# the record field of each family's approximation error: ||out - exact|| / ||exact||
ERROR_FIELDS = {family: f"rel_error_{family}" for family in FAMILIES}
# records written before the families had their own fields: old name -> new
LEGACY_ERROR_FIELDS = {"rel_error": ERROR_FIELDS["random"]}
