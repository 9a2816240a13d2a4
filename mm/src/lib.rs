//! The memory manager (being written).
#![no_std]
