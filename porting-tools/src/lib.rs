//! lmspec porting tools.
