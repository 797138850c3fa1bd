"""Analyses that several passes share, computed on demand from the graph (never from names):

- `attention`: every Softmax(Q·Kᵀ)·V attention, its score path, mask and bias terms, and what
  they mean numerically (causal, sliding window, ALiBi, softcap);
- `attention_blocks`: per attention, its Q, K, V and O projections and head counts;
- `linear`: the linear layers (MatMul with a constant 2-D weight, and its bias);
- `mlps`: up projections, the channel-wise region and the down projection of each MLP;
- `layers`: the residual stream and the decoder layers.

Analyses never change the graph; the passes that use them do.
"""
