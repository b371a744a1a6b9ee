"""Process groups (TP, PP, DP), tensor-parallel layers, vocab-parallel pieces and the RNG tracker."""
