//! What the function is told: its environment ([`env`]), the routes it serves ([`route`]),
//! how each route orders its exports ([`export_order`]), where Braze is
//! ([`braze_endpoint`]) and the API key it is called with ([`api_key`]).

pub mod api_key;
pub mod braze_endpoint;
pub mod env;
pub mod export_order;
pub mod route;
