"""The text side that the server and training both need, in numpy only (no torch): padding token rows, the first
word piece of each word, BIO entity spans, and a CRF's Viterbi decode over word emissions."""
