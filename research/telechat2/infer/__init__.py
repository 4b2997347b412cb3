"""Generation with a preallocated KV cache, sampling, and the predict/chat front ends."""
