"""What agents and balancers say to each other: the types both sides speak (the agent imports nothing else of the
balancer's, and the balancer nothing of the agent's).

    reports      an agent's report of its llama.cpp server (slots, model(s), state, supervision) and its checks
    states       the states a server is reported in, and the fix an operator reads beside each
    models       what a server serves (Serving): its model names and aliases, and how a request's model matches
    supervision  what the balancer asks of a supervising agent: desired states, drain marks, control answers
"""
