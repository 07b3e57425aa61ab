//! Integration tests of lmspec: one binary, one module per area.
mod bad_input;
mod batch;
mod cli;
mod embed;
mod generation;
mod gguf_quants;
mod gguf_reference;
mod gguf_tokenizer;
mod golden;
mod hostile;
mod hub;
mod hub_server;
mod port;
mod references;
mod support;
mod tools;
