//! lmspec-lm: the language-model layer over `lmspec-engine`: tokenizers,
//! chat templates, sampling, the token loop and text generation, chat
//! sessions with the tool loop, the model container, tool-call formats and
//! the embedder.
pub mod batch;
pub mod constrain;
pub mod embed;
pub mod generate;
pub mod image_processor;
pub mod lm;
mod pil;
pub mod prompt_cache;
pub mod registry;
pub mod rerank;
pub mod sampling;
pub mod speculative;
pub mod st_modules;
pub mod template;
pub mod tokenizer;
pub mod tools;
pub mod tune;
pub mod video;
pub mod vision;

pub use embed::{Embedder, Pooling};
pub use lm::{run_tool_loop, ChatSession, LanguageModel, Message, ModelContainer, Tool};
pub use rerank::Reranker;
