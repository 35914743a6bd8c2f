//! What the function is told: its environment ([`env`]), the routes it serves ([`route`]) and
//! how each route orders its exports ([`export_order`]).

pub mod env;
pub mod export_order;
pub mod route;
