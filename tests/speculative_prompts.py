"""Prompts for the speculative-decoding tests (Python and Node runtimes)."""

# 20 prompts: copies and repeats (lookup finds them) and free text (it finds little)
PROMPTS = ["Hello, world Hello, world Hello", "1 2 3 4 1 2 3 4 1 2", "The quick brown fox jumps over the quick brown",
           "a", "abcabcabcabc", "Once upon a time there was a very long prompt", "zz", "What is 2+2?",
           "ABCDEFGHIJKLMNOPQRSTUVWXYZ ABCDEFG", "the cat sat on the mat; the cat sat on the", "x" * 40,
           "def f(x): return x + 1\ndef g(x): return f(x) + 1\ndef h(x): return", "red green blue red green",
           "To be or not to be, that is the question. To be", "0101010101", "lorem ipsum dolor sit amet",
           "kiln kiln kiln", "A. B. C. D. A. B.", "one two three four five six seven", "?!?!?!"]
