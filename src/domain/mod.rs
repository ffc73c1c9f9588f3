//! Decisions made without a database or a network: what an observation
//! changes ([`observe`]), which alerts hold ([`alerts`]), and the values a
//! delivery's processing passes on ([`outcome`]). The storage engines call
//! these inside their transactions, so every engine decides alike.

pub mod alerts;
pub mod observe;
pub mod outcome;
