//! `moe`: a routed mixture of experts, as mlx-lm's sparse MoE blocks with a
//! `SwitchGLU` (gated experts) or a `SwitchMLP` (plain experts): a router
//! scores the experts per token and the top-k run through stacked expert
//! weights (`[E, out, in]`).
use super::{
    choice, expect_flat, op, Act, Layout, OpError, Positive, Resolved, WeightName, WeightReq,
};

choice! {
    /// How routing scores come from the router's logits.
    pub enum Routing {
        SoftmaxTopk = "softmax_topk",
        TopkSoftmax = "topk_softmax",
        SigmoidTopk = "sigmoid_topk",
        Sparsemixer = "sparsemixer",
        TopkSigmoid = "topk_sigmoid",
    }
}

choice! {
    /// What the experts of dropped groups score before the top-k choice.
    pub enum GroupFill {
        Zero = "zero",
        NegInf = "neg_inf",
    }
}

choice! {
    /// How a gated expert combines its gate and up projections.
    pub enum ExpertGlu {
        Plain = "plain",
        Oai = "oai",
    }
}

choice! {
    /// How a mixture of experts is split across the ranks of a
    /// tensor-parallel run.
    pub enum MoeShard {
        /// Every rank holds every expert whole.
        None = "none",
        /// Each rank holds a slice of every expert's intermediate features.
        Width = "width",
        /// Each rank holds an even share of the experts, whole.
        Experts = "experts",
    }
}

choice! {
    /// How a group of experts is scored for group-limited routing.
    pub enum GroupScore {
        Max = "max",
        Top2Sum = "top2_sum",
    }
}

op! {
    /// Top-k routed mixture of gated (GLU) or plain experts with stacked weights and gather matmuls; a second input, when given, is what the router scores (the experts run on the first).
    "moe" (1..=2) => Moe {
        router: WeightName, "module holding the router `weight` [experts + zero_experts, in]";
        experts: WeightName, "module holding stacked `gate_proj`, `up_proj` [experts, hidden, in] and `down_proj` [experts, in, hidden] (gated), or `fc1` [experts, hidden, in] and `fc2` [experts, in, hidden] (not gated)";
        num_experts: i64, "number of experts";
        top_k: i64, "experts per token";
        hidden: i64, "an expert's intermediate width";
        routing: Routing = Routing::SoftmaxTopk, "softmax_topk: softmax over all experts, then the top k; topk_softmax: the top k logits, then a softmax over them; sigmoid_topk: float32 sigmoid scores, then the top k; sparsemixer: k rounds of the best remaining logit, weighted by its softmax over the logits within the jitter band of it; topk_sigmoid: the top k logits, weighted by their float32 sigmoid";
        jitter: f64 = 0.01, "sparsemixer: logits further than 2 jitter (relative) below the pick are left out of its softmax";
        norm_topk: bool = false, "renormalise the k scores to sum to 1";
        scale: f64 = 1.0, "factor on the routing weights (routed_scaling_factor)";
        correction_bias: bool = false, "the router has `e_score_correction_bias` [experts], added to the scores to choose experts (not to weight them)";
        groups: i64 = 1, "expert groups for group-limited routing (1: none)";
        topk_groups: i64 = 1, "groups whose experts may be chosen (the others are zeroed first)";
        group_score: GroupScore = GroupScore::Max, "a group's score: its best expert (max) or its two best summed (top2_sum)";
        group_fill: GroupFill = GroupFill::Zero, "the score the experts of dropped groups get before the choice (zero, or neg_inf: never chosen)";
        act: Act = Act::Silu, "activation of the gate projection (of fc1 when not gated)";
        gated: bool = true, "gated experts down(act(gate x) * up x); false: fc2(act(fc1 x))";
        expert_bias: bool = false, "each stacked projection has a `bias` [experts, out]";
        router_bias: bool = false, "the router has a `bias` [experts + zero_experts]";
        zero_experts: i64 = 0, "identity experts after the real ones: a token routed to one adds its input times the weight";
        limit: Option<Positive<f64>> = None, "clamped SwiGLU of gated experts: min(act(gate), limit) * clip(up, -limit, limit) (oai: the gate and up clip)";
        glu: ExpertGlu = ExpertGlu::Plain, "plain: act(gate) * up; oai: gpt-oss's (up + 1) * gate * sigmoid(1.702 gate)";
        scale_input: bool = false, "the routing weight scales the expert's input instead of its output (llama4's top-1 experts; needs top_k 1)";
        shard: MoeShard = MoeShard::None, "tensor parallelism: none (every rank holds every expert), width (each rank a slice of every expert's intermediate features: gate/up rows, down columns) or experts (each rank an even share of the experts, whole; the router stays whole and a token's experts on other ranks count zero here); the partial outputs are summed across ranks";
    }
}

impl Moe {
    pub fn resolve(&self, scope: &str, inputs: &[Layout]) -> Result<Resolved, OpError> {
        let d = expect_flat(inputs, 0)?;
        // The router reads the second input when there is one.
        let routed_on = if inputs.len() > 1 {
            expect_flat(inputs, 1)?
        } else {
            d
        };
        let (e, k, f, z) = (self.num_experts, self.top_k, self.hidden, self.zero_experts);
        if z < 0 {
            return Err(OpError::new(
                "zero_experts",
                format!("{z} zero experts: must be 0 or more"),
            ));
        }
        // Routed slots: the real experts and the identity ones.
        let slots = e + z;
        if e < 1 || k < 1 || k > slots {
            return Err(OpError::new(
                "top_k",
                format!("top_k {k} must be between 1 and num_experts {e} (+ zero_experts {z})"),
            ));
        }
        let (g, tg) = (self.groups, self.topk_groups);
        if g < 1 || slots % g != 0 || tg < 1 || tg > g {
            return Err(OpError::new(
                "groups",
                format!("{g} groups of {slots} experts with {tg} kept: groups must divide the experts and 1 <= topk_groups <= groups"),
            ));
        }
        if !self.gated && (self.limit.is_some() || self.glu != ExpertGlu::Plain) {
            return Err(OpError::new(
                "gated",
                "limit and glu apply to gated experts only",
            ));
        }
        if self.scale_input && k != 1 {
            return Err(OpError::new(
                "scale_input",
                format!("input-scaled experts need top_k 1, not {k}"),
            ));
        }
        if self.routing == Routing::Sparsemixer && (g > 1 || self.correction_bias) {
            return Err(OpError::new(
                "routing",
                "sparsemixer routing takes no groups and no correction bias",
            ));
        }
        let (router, experts) = (self.router.under(scope), self.experts.under(scope));
        let mut weights = vec![WeightReq::matrix(
            "router",
            router.clone(),
            "weight",
            vec![slots, routed_on],
        )];
        // (name, out, in, the intermediate axis: rows of the up
        // projections, columns of the down projection)
        let projections: &[(&str, i64, i64, usize)] = if self.gated {
            &[
                ("gate_proj", f, d, 1),
                ("up_proj", f, d, 1),
                ("down_proj", d, f, 2),
            ]
        } else {
            &[("fc1", f, d, 1), ("fc2", d, f, 2)]
        };
        for &(name, out, inp, axis) in projections {
            let module = format!("{experts}.{name}");
            let weight = WeightReq::matrix("experts", module.clone(), "weight", vec![e, out, inp]);
            let bias = WeightReq::dense("expert_bias", module, "bias", vec![e, out]);
            let (weight, bias) = match self.shard {
                MoeShard::None => (weight, bias),
                MoeShard::Width => (weight.sharded(true, axis), bias.sharded(axis == 1, 1)),
                MoeShard::Experts => (weight.sharded_evenly(true, 0), bias.sharded_evenly(true, 0)),
            };
            weights.push(weight);
            if self.expert_bias {
                weights.push(bias);
            }
        }
        if self.router_bias {
            weights.push(WeightReq::dense(
                "router_bias",
                router.clone(),
                "bias",
                vec![slots],
            ));
        }
        if self.correction_bias {
            weights.push(WeightReq::dense(
                "correction_bias",
                router,
                "e_score_correction_bias",
                vec![slots],
            ));
        }
        Ok(Resolved {
            weights,
            ..Resolved::pure(Layout::flat(d))
        })
    }
}
