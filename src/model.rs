//! Domain vocabulary.
